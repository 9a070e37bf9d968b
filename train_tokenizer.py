"""Stage 1: train a VQ-KD visual tokenizer (paper Sec. 2.2): a ViT encoder whose patch features are
snapped to the nearest of K codes, and a decoder that must reproduce a frozen teacher's patch
features from the codes alone (cosine loss). It ends with a report of the tokenizer's health on the
val split (--report=FILE reports on any tokenizer file, ours or official, without training).

    python train_tokenizer.py                   # demo: offline, CPU, minutes
    torchrun --nproc_per_node=8 train_tokenizer.py --preset=clip_3x --data=/data/imagenet
    python train_tokenizer.py --report=out/tokenizer/ckpt.pt
Settings are --key=value (`--help` lists them); README.md has the recipes.
"""
import importlib
import io
import os
import pickle
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')  # before torch loads OpenMP: idle threads sleep

import torch
import torch.nn as nn
import torch.nn.functional as F

import beitv2
import data
import engine
import pictures
import settings
from settings import above, at_least, die, half_open, input_file, one_of, within


@dataclass
class Config(settings.Run):
    # the crop size seen by the tokenizer and the teacher; None: the --model's, as every None below
    img_size: int = at_least(1, None)
    min_crop_scale: float = above(0, 0.08)  # RandomResizedCrop's smallest area
    # an architecture of beitv2.PRESETS: vqkd_encoder_base_decoder_3x768x12_clip, ...
    model: str = 'vqkd_demo'
    patch_size: int = at_least(2, None)  # pixels per patch side
    embed_dim: int = at_least(1, None)  # width of the encoder and the decoder
    depth: int = at_least(1, None)  # encoder blocks
    num_heads: int = at_least(1, None)  # attention heads
    decoder_depth: int = at_least(1, None)  # decoder blocks
    codebook_size: int = at_least(1, None)  # K codes
    # the codebook's dimension (32 in the paper: the codes are looked up in 32-d)
    code_dim: int = at_least(1, None)
    decay: float = half_open(0.99, 0, 1)  # codebook EMA decay (1 would never move)
    # whose features the decoder learns to reproduce: clip (the paper's), dino, or the demo's hog
    # and hog_colour (no weights needed)
    teacher: str = one_of('hog', 'hog_colour', 'clip', 'dino')
    # a local weights file for clip (OpenAI's ViT-B-16.pt) or dino
    teacher_weights: str = input_file('')
    # optimizer steps in all (a resumed run counts the ones done); None: --epochs of them
    steps: int = at_least(1, 600)
    # per 128 images: the peak lr is lr x effective batch / 128 (official)
    lr: float = above(0, 1e-3)
    weight_decay: float = at_least(0, 1e-4)  # AdamW's
    # AdamW's
    betas: tuple = settings.rule((0.9, 0.99), 'two numbers in [0, 1)', settings.two_betas)
    # > 0: the report's numbers on the val split every N steps too (official
    # --calculate_codebook_usage); in the log as val_*
    eval_every: int = at_least(0, 0)
    # warn when, after the warmup, the codes used between two log lines fall below this share of the
    # codebook. The paper's tokenizer uses nearly all its codes; a collapsed one a few (unilm issues
    # #936, #1556, #877). At the demo's size a healthy run dips to 0.1 once, after k-means, then
    # recovers
    min_code_use: float = within(0.1, 0, 1)
    # a tokenizer file (ours or official) to report on, with --data's val split and --teacher: no
    # training
    report: str = input_file('')
    out_dir: str = 'out/tokenizer'  # where checkpoints, log.jsonl and the report's picture go


IMAGENET = dict(data='', lr=5e-5, batch_size=64, recipe_batch=512, epochs=100, warmup_epochs=10,
                steps=None, warmup_steps=None, workers=10, log_every=100, ckpt_every=2500)
PRESETS = {  # the paper's ImageNet-1k recipes (official TOKENIZER.md): 8 GPUs x 64 = 512 images
    'demo': {},
    # Fashion-MNIST (docs/results.md): grey shapes, intensity and edges
    'fmnist': dict(teacher='hog_colour'),
    'clip_3x': dict(IMAGENET, model='vqkd_encoder_base_decoder_3x768x12_clip', teacher='clip'),
    'clip_1x': dict(IMAGENET, model='vqkd_encoder_base_decoder_1x768x12_clip', teacher='clip'),
    'dino_1x': dict(IMAGENET, model='vqkd_encoder_base_decoder_1x768x12_dino', teacher='dino'),
    # not in the official zoo
    'dino_3x': dict(IMAGENET, model='vqkd_encoder_base_decoder_3x768x12_dino', teacher='dino'),
}

# -------------------------------------------------------------------- teachers


class HOGTeacher(nn.Module):
    """Demo target that needs no weights: per patch, histograms of oriented gradients (2x2 cells, 9
    unsigned orientations, as MaskFeat's target) of the colour channel with the strongest gradient
    at each pixel (Dalal and Triggs): the patch's geometry, blind to its colours. colour=True adds
    the mean colour and takes the histograms per channel instead. Centred over the image's patches
    and not normalised per patch (the cosine loss does that): non- negative targets would let a
    constant prediction score cos ~0.7, and a flat patch's direction would be its noise. Not the
    paper's teacher."""

    def __init__(self, patch_size, bins=9, colour=False):
        super().__init__()
        self.p, self.bins, self.colour = patch_size, bins, colour
        sobel = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]])
        self.register_buffer('kernel', torch.stack([sobel, sobel.t()])[:, None].repeat(3, 1, 1, 1))

    def forward(self, images):                                     # (B, 3, H, W) in [0, 1]
        g = F.conv2d(F.pad(images, (1, 1, 1, 1), mode='reflect'), self.kernel, groups=3)
        gx, gy = g[:, 0::2], g[:, 1::2]                             # (B, 3, H, W) each
        mag = torch.hypot(gx, gy)
        if not self.colour:                                          # the strongest channel
            top = mag.argmax(1, keepdim=True)
            gx, gy, mag = gx.gather(1, top), gy.gather(1, top), mag.gather(1, top)  # (B, 1, H, W)
        b = (torch.atan2(gy, gx) % torch.pi) / torch.pi * self.bins  # soft-assign to 2 nearest bins
        lo, frac = b.floor().long() % self.bins, b - b.floor()
        hist = F.one_hot(lo, self.bins) * (1 - frac)[..., None]        # the lower bin's share
        hist = hist + F.one_hot((lo + 1) % self.bins, self.bins) * frac[..., None]  # the upper's
        hist = (hist * mag[..., None]).permute(0, 1, 4, 2, 3).flatten(1, 2)  # (B, c*bins, H, W)
        cells = F.avg_pool2d(hist, self.p // 2)                     # 2x2 cells per patch
        f = F.unfold(cells, 2, stride=2).transpose(1, 2).contiguous()  # (B, patches, 4c)
        if self.colour:
            colours = F.avg_pool2d(images, self.p).flatten(2).transpose(1, 2)  # each patch's colour
            f = torch.cat([f, colours], -1)                         # (B, patches, features)
        return f - f.mean(1, keepdim=True)  # centred per image: a constant guess scores cos 0


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class CLIPBlock(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)   # CLIP: eps 1e-5
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(d, 4 * d), gelu=QuickGELU(),
                                             c_proj=nn.Linear(4 * d, d)))

    def forward(self, x):
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class CLIPVisual(nn.Module):
    """OpenAI CLIP's image tower, with OpenAI's parameter names. VQ-KD target (official,
    modified CLIP): ln_post on all tokens, [CLS] dropped, projected: (B, n, 512) for ViT-B/16."""
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

    def __init__(self, width, layers, patch, grid, out_dim):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros(grid * grid + 1, width))
        self.ln_pre, self.ln_post = nn.LayerNorm(width), nn.LayerNorm(width)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(CLIPBlock(width, width // 64)
                                                   for _ in range(layers))
        self.proj = nn.Parameter(torch.zeros(width, out_dim))

    @staticmethod
    def from_state(sd):
        sd = {k.removeprefix('visual.'): v for k, v in sd.items() if k.startswith('visual.')}
        if 'conv1.weight' not in sd:
            die('CLIP teacher: no visual.conv1.weight in the weights file')
        w = sd['conv1.weight']
        layers = beitv2.count_blocks(sd, 'transformer.res')  # transformer.resblocks.N
        grid = int((sd['positional_embedding'].shape[0] - 1) ** 0.5)
        model = CLIPVisual(w.shape[0], layers, w.shape[-1], grid, sd['proj'].shape[1])
        model.load_state_dict({k: v.float() for k, v in sd.items()})
        return model

    def forward(self, images):                                     # [0, 1] -> (B, n, out_dim)
        x = self.conv1(data.normalize(images.clone(), self.mean, self.std))
        x = x.flatten(2).transpose(1, 2)                            # (B, n, width)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], 1)
        x = self.ln_pre(x + self.positional_embedding)
        for blk in self.transformer.resblocks:
            x = blk(x)
        return self.ln_post(x)[:, 1:] @ self.proj


class _Scripted:  # an object of a TorchScript archive, rebuilt as plain attributes (no code runs)
    def __setstate__(self, state):
        self.__dict__.update(state if isinstance(state, dict) else {})


SAFE_TORCHSCRIPT_GLOBALS = {('torch._utils', '_rebuild_tensor_v2'), ('collections', 'OrderedDict'),
                            ('torch.jit._pickle', 'restore_type_tag'),
                            ('torch.jit._pickle', 'build_intlist'),
                            ('torch.jit._pickle', 'build_doublelist'),
                            ('torch.jit._pickle', 'build_boollist')}


def read_torchscript(path):
    """The tensors of a TorchScript archive (OpenAI's ViT-B-16.pt), name -> tensor, read from its
    pickled data by an unpickler that knows only tensors and plain containers: torch.jit.load would
    run the archive's code (__setstate__ and the like); this runs none of it."""
    archive = zipfile.ZipFile(path)
    prefix = next(n for n in archive.namelist() if n.endswith('/data.pkl'))[:-len('data.pkl')]

    class Reader(pickle.Unpickler):
        def find_class(self, module, name):
            if module.split('.')[0] == '__torch__':  # the archive's own classes: attributes only
                return _Scripted
            if (module, name) in SAFE_TORCHSCRIPT_GLOBALS:  # tensors, containers, type tags: data
                return getattr(importlib.import_module(module), name)
            if module == 'torch' and name.endswith('Storage'):
                return getattr(torch, name)
            raise pickle.UnpicklingError(f'{path}: refused to load: it would call {module}.{name}')

        def persistent_load(self, pid):  # ('storage', storage type, key, location, size)
            storage = torch.frombuffer(bytearray(archive.read(f'{prefix}data/{pid[2]}')),
                                       dtype=torch.uint8).untyped_storage()
            return torch.storage.TypedStorage(wrap_storage=storage, dtype=pid[1].dtype,
                                              _internal=True)

    out = {}

    def collect(obj, name):  # module attributes: tensors, and submodules in turn
        for k, v in vars(obj).items():
            if torch.is_tensor(v):
                out[name + k] = v
            elif isinstance(v, _Scripted):
                collect(v, f'{name}{k}.')
    collect(Reader(io.BytesIO(archive.read(prefix + 'data.pkl'))).load(), '')
    return out


def load_clip(path):
    """OpenAI's ViT-B-16.pt (a TorchScript archive, read without running it) or any state dict with
    visual.* keys; without a file, open_clip's 'ViT-B-16'/'openai' when open_clip is installed."""
    if path:
        if not os.path.isfile(path):
            die(f'CLIP teacher: {path}: no such file')
        names = zipfile.ZipFile(path).namelist() if zipfile.is_zipfile(path) else []
        try:
            if any(n.endswith('/constants.pkl') for n in names):  # TorchScript, not torch.save
                sd = read_torchscript(path)
            else:
                sd = beitv2.state_dict_of(engine.read_checkpoint(path))
        except (pickle.UnpicklingError, ValueError) as e:
            die(str(e))
        return CLIPVisual.from_state(sd)
    try:
        import open_clip
        model = open_clip.create_model('ViT-B-16', pretrained='openai')
    except Exception as e:  # not installed, or no network
        die(f'CLIP teacher: pass --teacher_weights=ViT-B-16.pt (OpenAI file) ({e})')
    return CLIPVisual.from_state(model.state_dict())


class DINOTeacher(nn.Module):
    """DINO ViT-B/16 (LayerNorm eps 1e-6, exact GELU): final norm of the patch tokens."""

    def __init__(self, sd):
        super().__init__()
        for k in [k for k in sd if k.endswith('attn.qkv.bias')]:
            q, _, v = sd.pop(k).chunk(3)  # the k bias adds a per-query constant: softmax ignores it
            sd[k.replace('qkv.bias', 'q_bias')] = q
            sd[k.replace('qkv.bias', 'v_bias')] = v
        self.vit = beitv2.load_backbone(sd, abs_pos_emb=True, rel_pos='none', layer_scale=0.0)

    def forward(self, images):
        return self.vit.forward_patch_tokens(data.normalize(images.clone()))


def load_dino(path):
    if path:
        sd = beitv2.state_dict_of(engine.read_checkpoint(path))
    else:
        try:
            sd = torch.hub.load('facebookresearch/dino:main', 'dino_vitb16').state_dict()
        except Exception as e:  # no network, or not a DINO hub
            die(f'DINO teacher: pass --teacher_weights=dino_vitbase16_pretrain.pth ({e})')
    for pre in ('module.', 'backbone.', 'teacher.'):
        sd = {k.removeprefix(pre): v for k, v in sd.items()}
    return DINOTeacher({k: v for k, v in sd.items() if not k.startswith('head.')})


def build_teacher(cfg):
    """Frozen, in eval mode, called under no_grad: a module mapping [0, 1] images to (B, n, C)."""
    try:
        if cfg.teacher == 'clip':
            teacher = load_clip(cfg.teacher_weights)
        elif cfg.teacher == 'dino':
            teacher = load_dino(cfg.teacher_weights)
        else:
            teacher = HOGTeacher(cfg.patch_size, colour=cfg.teacher == 'hog_colour')
    except (ValueError, KeyError, RuntimeError) as e:  # weights of another model or layout
        die(f'--teacher={cfg.teacher} --teacher_weights={cfg.teacher_weights}: '
            f'{" ".join(str(e).split())[:300]}')
    return teacher.eval().requires_grad_(False)

# -------------------------------------------------------- the report, training


@torch.no_grad()
def validate(model, teacher, val, cfg, env):
    """On the val split (centre crops), all ranks together: the mean cosine between the decoder's
    output and the teacher's features, the codes used (their count and share of the codebook), the
    perplexity of their use; and, apart, the count of each code (a tensor). -> (numbers, counts)"""
    model.eval()

    def cosine_and_codes(images):  # (B, 1 + n): each image's mean cosine to the teacher, its codes
        rec, codes, _ = model(images)
        cosine = (beitv2.l2norm(rec) * beitv2.l2norm(teacher(images).to(rec.dtype))).sum(-1)
        return torch.cat([cosine.mean(1, keepdim=True).float(), codes.float()], 1)
    crops = data.Mapped(val, data.eval_transform(cfg.img_size, normalized=False))
    out, _ = engine.gather(cosine_and_codes, crops, cfg, env, 'scoring the val split')
    counts = torch.bincount(out[:, 1:].long().flatten(), minlength=cfg.codebook_size)
    return dict(cosine=out[:, 0].mean().item(), **beitv2.code_usage(counts)), counts


def report(model, teacher, val, cfg, env):
    """Is the tokenizer any good? Its numbers on the val split (validate), a line saying what they
    mean, and OUT_DIR/code_usage.png: how often each code is used, the most used first."""
    r, counts = validate(model, teacher, val, cfg, env)
    env.print(f'report on {cfg.data} val ({len(val)} images): {r["codes_used"]} of '
              f'{len(counts)} codes used ({r["used_share"]:.0%}), perplexity '
              f'{r["perplexity"]:.1f}, cosine to the teacher {r["cosine"]:.3f}')
    if r['used_share'] < cfg.min_code_use:
        env.print(f'note: few codes are used (under --min_code_use={cfg.min_code_use}): the '
                  'codebook has collapsed; try a lower --lr, a longer warmup, or a smaller '
                  "--code_dim (the paper's 32)")
    path = os.path.join(cfg.out_dir, 'code_usage.png')
    title = (f'{cfg.report or cfg.out_dir}: how often each of its {len(counts)} codes is used on '
             f'{cfg.data} val, the most used first')
    if env.master:
        pictures.code_usage_png(counts.cpu(), path, title)
    return dict(r, png=path)


@settings.one_line_errors
def main(argv=None):
    cfg = settings.configure(Config(), PRESETS, argv)
    env = engine.Env(cfg.device, cfg.dtype, cfg.seed, cfg.out_dir, cfg.compile)
    if cfg.report:  # the tokenizer's own sizes
        model = engine.read_tokenizer(cfg.report, env.device)
        for k in ('img_size', 'patch_size', 'codebook_size'):
            setattr(cfg, k, getattr(model.cfg, k))
    if cfg.img_size % cfg.patch_size or cfg.patch_size % 2:
        die(f'img_size {cfg.img_size} must be divisible by patch_size {cfg.patch_size} (even)')
    grid = cfg.img_size // cfg.patch_size
    if cfg.batch_size * grid ** 2 < cfg.codebook_size:
        die(f'k-means init needs at least codebook_size={cfg.codebook_size} patch vectors in the '
            f'first batch; {cfg.batch_size} images give {cfg.batch_size * grid ** 2}: raise '
            '--batch_size or lower --codebook_size')
    teacher = build_teacher(cfg).to(env.device)
    with torch.no_grad():
        probe = teacher(torch.zeros(1, 3, cfg.img_size, cfg.img_size, device=env.device))
    if probe.shape[1] != grid * grid:
        die(f'the teacher gives {probe.shape[1]} tokens, the tokenizer {grid * grid}: match '
            'img_size/patch_size')
    val = data.build_dataset(cfg.data, 'val', cfg.img_size, labels=False)
    if val is None and (cfg.report or cfg.eval_every):
        die(f'--data={cfg.data} has no val split ({cfg.data}/val) to report on or score')
    if cfg.report:
        result = report(model, teacher, val, cfg, env)
        env.close()
        return result
    model = beitv2.VQKD(settings.model_config(cfg, teacher_dim=probe.shape[-1])).to(env.device)
    loader = data.make_loader(data.build_dataset(cfg.data, 'train', cfg.img_size, labels=False),
                              data.Crops((cfg.img_size,), cfg.min_crop_scale), cfg, env)
    peak = cfg.lr * cfg.batch_size * cfg.accum * env.world / 128  # official: per 128 images
    optimizer = engine.adamw(model, cfg, peak)  # fused: 1 kernel
    counts = torch.zeros(cfg.codebook_size, dtype=torch.long, device=env.device)  # since last log

    def train_step(model, batch):
        images = data.to_device(batch['images'], env.device)
        with torch.no_grad():
            target = teacher(images)
        _, codes, losses = model(images, target)
        counts.index_add_(0, codes.flatten(), torch.ones_like(codes.flatten()))
        return losses['loss'], {k: losses[k].detach() for k in ('rec_loss', 'quant_loss')}

    def at_log(step):  # the codes used since the last log line, on all ranks
        usage = beitv2.code_usage(env.all_reduce(counts))
        counts.zero_()
        if usage['used_share'] < cfg.min_code_use and step > cfg.warmup_steps:
            env.print(f'note: step {step}: {usage["codes_used"]} of {cfg.codebook_size} codes used '
                      f'since the last log line, under --min_code_use={cfg.min_code_use}: the '
                      'codebook may be collapsing; try a lower --lr, a longer warmup or a smaller '
                      '--code_dim')
        return {k: usage[k] for k in ('codes_used', 'perplexity')}

    def score(model):
        return validate(model, teacher, val, cfg, env)[0]
    engine.plan(cfg, env, loader, optimizer)
    engine.fit(cfg, env, model, optimizer, loader, train_step, score if cfg.eval_every else None,
               at_log)
    if val is None:
        env.print(f'note: --data={cfg.data} has no val split: no report')
    else:
        report(model, teacher, val, cfg, env)
    env.close()
    return model


if __name__ == '__main__':
    main()
