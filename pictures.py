"""Look inside: a backbone's attention and a tokenizer's codes, as pictures (the official
visualize_attention.py and test_get_code.py, and the paper's codebook picture).

    python pictures.py --mode=attention --query=3,4     # patch (3, 4)'s attention in the last block, per head
    python pictures.py --mode=attention --query=cls --layer=3 --image=PHOTO.jpg --img_size=64
    python pictures.py --mode=codebook --checkpoint=out/tokenizer/ckpt.pt   # patches grouped by their code
    python pictures.py --mode=codes --checkpoint=out/tokenizer/ckpt.pt --image=PHOTO.jpg   # each patch's code
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
import common
import data
import evaluate


@dataclass
class Config:
    preset: str = 'demo'            # the only one: the settings below
    mode: str = common.one_of('attention', 'codebook', 'codes')
    checkpoint: str = 'out/pretrain/ckpt.pt'  # attention: a backbone; codebook, codes: a tokenizer
    data: str = 'demo'              # where the images come from without --image (its val split)
    image: str = ''                 # image file; '' = the first val image of --data
    img_size: int = common.at_least(1, 32)  # attention: the input size; not given: the backbone's training size
    layer: int = -1                 # attention: the block (0-based); -1 = last
    query: str = common.rule('cls', 'cls or ROW,COL', lambda v: re.fullmatch(r'cls|\d+,\d+', v))  # 0-based patch
    batch_size: int = common.at_least(1, 64)  # codebook: images encoded at a time
    device: str = ''                # '' = cuda if available; 'cpu' forces the CPU
    out_dir: str = 'out/pictures'   # where the pictures go

# ----------------------------------------------------------------------------- a backbone: attention


def picture_input(cfg, img_size, normalize):
    """The image of --image (or the first val image of --data), resized to img_size/0.875 and
    centre-cropped: (1, 3, S, S), and the same in [0, 1] for drawing."""
    try:
        img = data.load_image(cfg.image) if cfg.image else data.rgb(data.build_dataset(cfg.data, 'val', img_size)[0][0])
    except RuntimeError as e:  # unreadable, or no such file
        common.die(f'--image: {e}')
    shown = data.eval_transform(img_size, normalize=False)(img)[None]
    return (data.eval_transform(img_size)(img)[None] if normalize else shown), shown


@torch.no_grad()
def attention_probs(backbone, images, layer):
    """(B, nh, N, N) softmax attention of block `layer` (0-based), token 0 = [CLS]: the same
    logits the block computes (q/v biases, scale, relative position bias)."""
    x = backbone.forward_tokens(images, (layer - 1,))[1][0] if layer else backbone.with_cls(backbone.patches(images))
    blk = backbone.blocks[layer]
    q, k, _ = blk.attn.heads(blk.norm1(x))                                # each (B, nh, N, hs)
    logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)              # (B, nh, N, N)
    pos_bias = beitv2.pos_bias_from_table(blk.attn) if blk.attn.has_table else backbone.shared_pos_bias()
    return (logits if pos_bias is None else logits + pos_bias).softmax(-1)


def heat(image, a, box=None):
    """Overlay a map a (h, w) in [0, 1] on image (3, S, S): black -> red -> yellow; box = the
    (row, col, patch) to outline in cyan."""
    a = F.interpolate(a[None, None], size=image.shape[1:], mode='nearest')[0, 0]
    colour = torch.stack([(2 * a).clamp(max=1), (2 * a - 1).clamp(min=0), torch.zeros_like(a)])
    out = 0.35 * image + 0.65 * colour
    if box is not None:
        r, c, p = box
        edge = torch.zeros_like(a, dtype=torch.bool)
        edge[r * p:(r + 1) * p, c * p:(c + 1) * p] = True
        edge[r * p + 1:(r + 1) * p - 1, c * p + 1:(c + 1) * p - 1] = False  # the patch's outline
        out = torch.where(edge, out.new_tensor([0.0, 1, 1])[:, None, None], out)
    return out


def run_attention(cfg, env):
    """Official visualize_attention.py (DINO's tool): the attention of one query, [CLS] or a
    patch, over the patches of block --layer, per head, overlaid on the image (any input size:
    the relative position tables are resized as for fine-tuning)."""
    sd, mcfg = evaluate.load_weights(cfg.checkpoint)
    backbone = evaluate.build_backbone(cfg, sd, mcfg, num_classes=0, drop_path=0.0).to(env.device).eval()
    (h, w), p = backbone.grid, backbone.cfg.patch_size
    row, col = (None, None) if cfg.query == 'cls' else map(int, cfg.query.split(','))
    if row is not None and not (row < h and col < w):
        common.die(f'--query {row},{col} is outside the {h}x{w} patch grid')
    layer = common.block_index(cfg.layer, backbone.cfg.depth)
    x, shown = picture_input(cfg, cfg.img_size, normalize=True)
    probs = attention_probs(backbone, x.to(env.device), layer)[0].float().cpu()  # (nh, N, N)
    q = 0 if row is None else 1 + row * w + col
    maps = probs[:, q, 1:].view(-1, h, w)                                  # (nh, h, w) over patches
    maps = maps / maps.flatten(1).max(1).values[:, None, None]             # each head to [0, 1]
    box = None if row is None else (row, col, p)
    tiles = [shown[0]] + [heat(shown[0], m, box) for m in maps]
    path = os.path.join(cfg.out_dir, 'attention.png')
    save_titled(torch.stack(tiles), path, f'{cfg.checkpoint}, block {layer}: where {cfg.query} attends (the image, '
                f'then heads 1-{len(maps)}, each from black = none to yellow = its most; cyan box: the query patch)')
    top = [int(m.flatten().argmax()) for m in maps]
    return dict(png=path, layer=layer, query=cfg.query, heads=len(maps),
                peak=' '.join(f'{t // w},{t % w}' for t in top))

# ----------------------------------------------------------------------------- a tokenizer: codebook, codes


def code_maps(codes, tok, size):  # (B, n) codes -> (B, 3, size, size): a fixed random colour per code, in any picture
    palette = torch.rand(tok.cfg.codebook_size, 3, generator=torch.Generator().manual_seed(0)).to(codes.device)
    return F.interpolate(palette[codes].view(-1, *tok.grid, 3).permute(0, 3, 1, 2), size=size, mode='nearest')


@torch.no_grad()
def run_codebook(cfg, env, n_images=512, n_codes=16, per_code=16):
    """The paper's codebook picture: image patches grouped by the code they get (the most used
    codes, one row each), and token maps (each code a colour) beside a few images."""
    tok = common.read_tokenizer(cfg.checkpoint, env.device)
    val = data.build_dataset(cfg.data, 'val', cfg.img_size)
    ev = data.eval_transform(tok.cfg.img_size, normalize=False)
    images = torch.stack([ev(data.rgb(val[i][0])) for i in range(min(n_images, len(val)))]).to(env.device)
    codes = torch.cat([tok.encode(x) for x in images.split(cfg.batch_size)])   # (n, N)
    p = tok.cfg.patch_size
    patches = images.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(-1, 3, p, p)
    flat = codes.flatten()
    top = torch.bincount(flat, minlength=tok.cfg.codebook_size).topk(n_codes).indices
    rows = []
    for c in top:
        hits = patches[flat == c][:per_code]
        rows.append(torch.cat([hits, hits.new_ones(per_code - len(hits), 3, p, p)]))
    save_titled(torch.cat(rows), os.path.join(cfg.out_dir, 'codebook.png'), f'{cfg.checkpoint}: its {len(rows)} most '
                f'used codes, one row each: val image patches that the tokenizer gives that code', per_code, 32)
    pairs = torch.stack([images[:8], code_maps(codes[:8], tok, images.shape[2:])], 1).flatten(0, 1)
    save_titled(pairs, os.path.join(cfg.out_dir, 'token_maps.png'), f'{cfg.checkpoint}: val images, each beside '
                'its token map (a patch per square, a colour per code)', 4, 128)
    used = int((torch.bincount(flat, minlength=tok.cfg.codebook_size) > 0).sum())
    return dict(codes_used=used, images=len(images), png=os.path.join(cfg.out_dir, 'codebook.png'))


@torch.no_grad()
def run_codes(cfg, env):
    """Official test_get_code.py: the tokenizer's code of every patch of one image (resize
    img_size/0.875, centre crop, values in [0, 1]), printed as a grid, and a picture of the image
    beside its code map (each code one colour; the colours of --mode=codebook's token maps)."""
    tok = common.read_tokenizer(cfg.checkpoint, env.device)
    _, shown = picture_input(cfg, tok.cfg.img_size, normalize=False)
    codes = tok.encode(shown.to(env.device))[0].cpu()                      # (n,)
    h, w = tok.grid
    width = len(str(tok.cfg.codebook_size - 1))
    env.print('\n'.join(' '.join(f'{c:{width}d}' for c in row) for row in codes.view(h, w).tolist()))
    path, what = os.path.join(cfg.out_dir, 'codes.png'), cfg.image or f'the first val image of {cfg.data}'
    save_titled(torch.cat([shown, code_maps(codes[None], tok, shown.shape[2:])]), path, f'{what} and its codes from '
                f'{cfg.checkpoint} (a colour per code; {len(codes.unique())} distinct)')
    return dict(png=path, grid=f'{h}x{w}', distinct_codes=len(codes.unique()))


def save_titled(tiles, path, title, nrow=0, size=256):
    """tiles (B, 3, h, w) in [0, 1], enlarged to `size` px, as a grid (nrow per row; 0 = all in one) under the title
    that says what they show (also the PNG's Title)."""
    tiles = F.interpolate(tiles, scale_factor=max(1, size // tiles.shape[-1]), mode='nearest')
    grid = to_pil_image(make_grid(tiles, nrow=nrow or len(tiles), padding=2, pad_value=1).cpu())
    lines = textwrap.wrap(title, max(30, grid.width // 8))
    img = Image.new('RGB', (grid.width, grid.height + 16 * len(lines) + 6), 'white')
    img.paste(grid, (0, 16 * len(lines) + 6))
    ImageDraw.Draw(img).multiline_text((4, 3), '\n'.join(lines), fill='black', font=ImageFont.load_default(13))
    info = PngImagePlugin.PngInfo()
    info.add_text('Title', title)
    img.save(path, pnginfo=info)


def main(argv=None):
    cfg = common.configure(Config(), {'demo': {}}, argv)
    if cfg.mode == 'attention' and 'img_size' not in cfg.given:  # the size the backbone was trained at
        cfg.img_size = evaluate.trained_img_size(cfg.checkpoint) or cfg.img_size
    env = common.Env(cfg)
    result = dict(attention=run_attention, codebook=run_codebook, codes=run_codes)[cfg.mode](cfg, env)
    env.print(f'{cfg.mode}: ' + ', '.join(f'{k} {v}' for k, v in result.items()))
    env.close()
    return result


if __name__ == '__main__':
    main()
