"""Look inside: a backbone's attention and a tokenizer's codes, as pictures (the official
visualize_attention.py and test_get_code.py, and the paper's codebook picture).

    python pictures.py --mode=attention --query=3,4     # patch (3, 4)'s attention, last block
    python pictures.py --mode=attention --query=cls --layer=3 --image=PHOTO.jpg --img_size=64
    python pictures.py --mode=codebook --checkpoint=out/tokenizer/ckpt.pt    # patches by code
    python pictures.py --mode=codes --checkpoint=out/tokenizer/ckpt.pt --image=PHOTO.jpg
Settings are --key=value (`--help` lists them); the pictures go to OUT_DIR.
"""
import os
import re
import textwrap
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin
from torchvision.transforms.functional import to_pil_image
from torchvision.utils import make_grid

import beitv2
import data
import engine
import settings
from settings import at_least, die, one_of


@dataclass
class Config:
    preset: str = 'demo'  # the only one: the settings below
    # attention: where a query attends, per head | codebook: patches grouped by their code | codes:
    # the code of each patch of one image
    mode: str = one_of('attention', 'codebook', 'codes')
    # attention: a backbone (ours, official, timm); codebook, codes: a tokenizer
    checkpoint: str = 'out/pretrain/ckpt.pt'
    data: str = 'demo'  # where the images come from without --image (its val split)
    image: str = ''  # an image file; '' = the first val image of --data
    # attention: the input size (the position tables are resized); None: the size the backbone was
    # trained at
    img_size: int = at_least(1, None)
    layer: int = -1  # attention: the block (0-based); -1 = the last
    # attention: the token that attends: [CLS], or the patch at ROW,COL (0-based)
    query: str = settings.rule('cls', 'cls or ROW,COL', lambda v: re.fullmatch(r'cls|\d+,\d+', v))
    batch_size: int = at_least(1, 64)  # codebook: images encoded at a time
    device: str = ''  # '' = cuda if there is one; cpu forces the CPU
    out_dir: str = 'out/pictures'  # where the pictures go

# ------------------------------------------------------- a backbone: attention


def picture_input(cfg, img_size):
    """The image of --image (or the first val image of --data), resized to img_size/0.875 and
    centre-cropped: (1, 3, S, S) in [0, 1]."""
    if cfg.image:
        img = data.load_image(cfg.image)  # an unreadable one ends the run in one line
    else:
        img = data.rgb(data.build_dataset(cfg.data, 'val', img_size)[0][0])
    return data.eval_transform(img_size, normalized=False)(img)[None]


@torch.no_grad()
def attention_probs(backbone, images, layer):
    """(B, nh, N, N) softmax attention of block `layer` (0-based), token 0 = [CLS]: the same
    logits the block computes (q/v biases, scale, relative position bias)."""
    if layer:
        x = backbone.forward_tokens(images, (layer - 1,))[1][0]   # the block's input
    else:
        x = backbone.with_cls(backbone.patches(images))
    blk = backbone.blocks[layer]
    q, k, _ = blk.attn.heads(blk.norm1(x))                        # each (B, nh, N, hs)
    bias = backbone.shared_pos_bias()                             # None without a shared table
    if blk.attn.has_table:
        bias = beitv2.pos_bias_from_table(blk.attn)
    return beitv2.attention_probs(q, k, bias)


def heat(image, a, box=None):
    """Overlay a map a (h, w) in [0, 1] on image (3, S, S): black -> red -> yellow; box = the
    (row, col, patch) to outline in cyan."""
    a = F.interpolate(a[None, None], size=image.shape[1:])[0, 0]  # nearest, the default
    colour = torch.stack([(2 * a).clamp(max=1), (2 * a - 1).clamp(min=0), torch.zeros_like(a)])
    out = 0.35 * image + 0.65 * colour
    if box is not None:
        r, c, p = box
        edge = torch.zeros_like(a, dtype=torch.bool)
        edge[r * p:(r + 1) * p, c * p:(c + 1) * p] = True
        edge[r * p + 1:(r + 1) * p - 1, c * p + 1:(c + 1) * p - 1] = False  # the patch's outline
        out[:, edge] = out.new_tensor([0.0, 1, 1])[:, None]
    return out


def run_attention(cfg, env):
    """Official visualize_attention.py (DINO's tool): the attention of one query, [CLS] or a
    patch, over the patches of block --layer, per head, overlaid on the image (any input size:
    the relative position tables are resized as for fine-tuning)."""
    backbone = engine.read_backbone(cfg.checkpoint, img_size=cfg.img_size).to(env.device).eval()
    (h, w), p = backbone.grid, backbone.cfg.patch_size
    q, box = 0, None  # [CLS]: token 0, no box
    if cfg.query != 'cls':
        row, col = map(int, cfg.query.split(','))
        if not (row < h and col < w):
            die(f'--query {row},{col} is outside the {h}x{w} patch grid')
        q, box = 1 + row * w + col, (row, col, p)
    try:
        layer = beitv2.block_index(cfg.layer, backbone.cfg.depth)
    except ValueError as e:
        die(f'--layer: {e}')
    shown = picture_input(cfg, backbone.cfg.img_size)
    x = data.normalize(shown.clone()).to(env.device)
    probs = attention_probs(backbone, x, layer)[0].float().cpu()      # (nh, N, N)
    maps = probs[:, q, 1:].view(-1, h, w)                              # (nh, h, w) over patches
    maps = maps / maps.flatten(1).max(1).values[:, None, None]         # each head to [0, 1]
    path = os.path.join(cfg.out_dir, 'attention.png')
    save_titled(torch.stack([shown[0]] + [heat(shown[0], m, box) for m in maps]), path,
                f'{cfg.checkpoint}, block {layer}: where {cfg.query} '
                f'attends (the image, then heads 1-{len(maps)}, each from black = none to yellow = '
                'its most; cyan box: the query patch)')
    top = [int(m.flatten().argmax()) for m in maps]
    return dict(png=path, layer=layer, query=cfg.query, heads=len(maps),
                peak=' '.join(f'{t // w},{t % w}' for t in top))

# ------------------------------------------------------ a tokenizer: its codes


def code_maps(codes, tok, size):
    """(B, n) codes -> (B, 3, size, size): each code a fixed random colour, the same in every
    picture."""
    palette = torch.rand(tok.cfg.codebook_size, 3, generator=torch.Generator().manual_seed(0))
    colours = palette.to(codes.device)[codes].view(-1, *tok.grid, 3).permute(0, 3, 1, 2)
    return F.interpolate(colours, size=size)  # nearest


@torch.no_grad()
def run_codebook(cfg, env, per_code=16):
    """The paper's codebook picture: image patches grouped by the code they get (the most used
    codes, one row each), and token maps (each code a colour) beside a few images."""
    tok = engine.read_tokenizer(cfg.checkpoint, env.device)
    val = data.build_dataset(cfg.data, 'val', tok.cfg.img_size)
    crop = data.eval_transform(tok.cfg.img_size, normalized=False)
    images = torch.stack([crop(data.rgb(val[i][0])) for i in range(min(512, len(val)))])
    images = images.to(env.device)
    codes = torch.cat([tok.encode(x) for x in images.split(cfg.batch_size)])   # (n, N)
    p = tok.cfg.patch_size
    patches = F.unfold(images, p, stride=p).transpose(1, 2).reshape(-1, 3, p, p)  # row-major
    flat = codes.flatten()
    counts = torch.bincount(flat, minlength=tok.cfg.codebook_size)
    rows = []
    for c in counts.topk(16).indices:  # the 16 most used codes
        hits = patches[flat == c][:per_code]
        rows.append(torch.cat([hits, hits.new_ones(per_code - len(hits), 3, p, p)]))  # white after
    path = os.path.join(cfg.out_dir, 'codebook.png')
    save_titled(torch.cat(rows), path, f'{cfg.checkpoint}: its {len(rows)} most used codes, one '
                'row each: val image patches that the tokenizer gives that code', per_code, 32)
    pairs = torch.stack([images[:8], code_maps(codes[:8], tok, images.shape[2:])], 1)
    save_titled(pairs.flatten(0, 1), os.path.join(cfg.out_dir, 'token_maps.png'),
                f'{cfg.checkpoint}: val images, each beside its token map (a patch per square, a '
                'colour per code)', 4, 128)
    return dict(codes_used=int(counts.count_nonzero()), images=len(images), png=path)


@torch.no_grad()
def run_codes(cfg, env):
    """Official test_get_code.py: the tokenizer's code of every patch of one image (resize
    img_size/0.875, centre crop, values in [0, 1]), printed as a grid, and a picture of the image
    beside its code map (each code one colour; the colours of --mode=codebook's token maps)."""
    tok = engine.read_tokenizer(cfg.checkpoint, env.device)
    shown = picture_input(cfg, tok.cfg.img_size)
    codes = tok.encode(shown.to(env.device))[0].cpu()                 # (n,)
    h, w = tok.grid
    width = len(str(tok.cfg.codebook_size - 1))
    rows = codes.view(h, w).tolist()
    env.print('\n'.join(' '.join(f'{c:{width}d}' for c in row) for row in rows))
    path = os.path.join(cfg.out_dir, 'codes.png')
    what = cfg.image or f'the first val image of {cfg.data}'
    save_titled(torch.cat([shown, code_maps(codes[None], tok, shown.shape[2:])]), path,
                f'{what} and its codes from {cfg.checkpoint} (a colour per code; '
                f'{len(codes.unique())} distinct)')
    return dict(png=path, grid=f'{h}x{w}', distinct_codes=len(codes.unique()))


def code_usage_png(counts, path, title, height=160):
    """How often each code is used, as bars: the codes sorted from the most used, a column each (the
    mean of a run of them when there are more codes than columns), each as tall as its count over
    the largest. A healthy codebook fills the width; a collapsed one leaves the right of it
    empty."""
    c = counts.double().sort(descending=True).values
    bars = F.adaptive_avg_pool1d(c[None, None], min(512, len(c)))[0, 0] / c[0].clamp(min=1)
    level = torch.arange(height, 0, -1, dtype=torch.double)[:, None] / height  # 1 at the top row
    img = torch.ones(3, height, len(bars))
    img[:, level <= bars] = torch.tensor([0.2, 0.4, 0.8])[:, None]  # blue bars on white
    save_titled(img[None], path, title)

# ---------------------------------------------------------------------- saving


def save_titled(tiles, path, title, nrow=0, size=256):
    """tiles (B, 3, h, w) in [0, 1], enlarged to `size` px, as a grid (nrow per row; 0 = all in one)
    under the title that says what they show (also the PNG's Title)."""
    tiles = F.interpolate(tiles, scale_factor=max(1, size // tiles.shape[-1]))  # nearest
    grid = to_pil_image(make_grid(tiles, nrow=nrow or len(tiles), padding=2, pad_value=1).cpu())
    lines = textwrap.wrap(title, max(30, grid.width // 8))
    img = Image.new('RGB', (grid.width, grid.height + 16 * len(lines) + 6), 'white')
    img.paste(grid, (0, 16 * len(lines) + 6))
    ImageDraw.Draw(img).multiline_text((4, 3), '\n'.join(lines), fill='black',
                                       font=ImageFont.load_default(13))
    info = PngImagePlugin.PngInfo()
    info.add_text('Title', title)
    img.save(path, pnginfo=info)


@settings.one_line_errors
def main(argv=None):
    cfg = settings.configure(Config(), {'demo': {}}, argv)
    env = engine.Env(cfg.device, out_dir=cfg.out_dir)
    modes = dict(attention=run_attention, codebook=run_codebook, codes=run_codes)
    result = modes[cfg.mode](cfg, env)
    env.print(f'{cfg.mode}: ' + ', '.join(f'{k} {v}' for k, v in result.items()))
    env.close()
    return result


if __name__ == '__main__':
    main()
