"""Stage 1: train a VQ-KD visual tokenizer (paper Sec. 2.2): a ViT encoder whose patch
features are snapped to the nearest of K codes, and a decoder that must reproduce a frozen
teacher's patch features from the codes alone (cosine loss).

    python train_tokenizer.py                                   # demo: offline, CPU, minutes
    torchrun --nproc_per_node=8 train_tokenizer.py --preset=clip_3x --data=/data/imagenet
Settings are --key=value (`--help` lists them); README.md has the recipes.
"""
import importlib
import io
import os
import pickle
import zipfile
from collections import OrderedDict
from dataclasses import asdict, dataclass
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')  # before torch loads OpenMP: idle threads sleep (a busy machine)

import torch
import torch.nn as nn
import torch.nn.functional as F

import beitv2
import common
import data


@dataclass
class Config(common.Run):
    img_size: int = common.at_least(1, None)  # crop size seen by tokenizer and teacher; None: --model's
    min_crop_scale: float = common.above(0, 0.08)  # RandomResizedCrop scale range (min_crop_scale, 1)
    # tokenizer: an architecture of beitv2.PRESETS; None = its value (teacher_dim = the teacher's)
    model: str = 'vqkd_demo'        # vqkd_encoder_base_decoder_3x768x12_clip, ...
    patch_size: int = common.at_least(2, None)
    embed_dim: int = common.at_least(1, None)
    depth: int = common.at_least(1, None)
    num_heads: int = common.at_least(1, None)
    decoder_depth: int = common.at_least(1, None)
    codebook_size: int = common.at_least(1, None)  # K codes
    code_dim: int = common.at_least(1, None)  # codebook dimension
    decay: float = common.within(0.99, 0, 1, ')')  # codebook EMA decay (1 would never move)
    teacher: str = common.one_of('hog', 'hog_colour', 'clip', 'dino')  # hog, hog_colour: the demo's, no weights
    teacher_weights: str = ''       # local weights file for clip / dino
    steps: int = common.at_least(1, 600)
    lr: float = common.above(0, 1e-3)  # per 128 images: peak lr = lr * effective batch / 128 (official)
    weight_decay: float = common.at_least(0, 1e-4)
    betas: tuple = common.betas((0.9, 0.99))
    eval_every: int = common.at_least(0, 0)  # > 0: val split every N steps and at the end: reconstruction loss,
    #                                 codebook usage (official --calculate_codebook_usage); log: val_*
    out_dir: str = 'out/tokenizer'  # where checkpoints and log.jsonl go

IMAGENET = dict(data='', lr=5e-5, batch_size=64, recipe_batch=512, epochs=100, warmup_epochs=10, workers=10,
                log_every=100, ckpt_every=2500)
PRESETS = {  # the paper's ImageNet-1k recipes (official TOKENIZER.md): 8 GPUs x 64 = 512 images
    'demo': {},
    'fmnist': dict(teacher='hog_colour'),  # Fashion-MNIST (docs/results.md): grey shapes, intensity and edges
    'clip_3x': dict(IMAGENET, model='vqkd_encoder_base_decoder_3x768x12_clip', teacher='clip'),
    'clip_1x': dict(IMAGENET, model='vqkd_encoder_base_decoder_1x768x12_clip', teacher='clip'),
    'dino_1x': dict(IMAGENET, model='vqkd_encoder_base_decoder_1x768x12_dino', teacher='dino'),
    'dino_3x': dict(IMAGENET, model='vqkd_encoder_base_decoder_3x768x12_dino', teacher='dino'),  # not released
}

# ----------------------------------------------------------------------------- teachers


class HOGTeacher(nn.Module):
    """Demo target that needs no weights: per patch, histograms of oriented gradients (2x2 cells, 9 unsigned
    orientations, as MaskFeat's target) of the colour channel with the strongest gradient at each pixel (Dalal and
    Triggs): the patch's geometry, blind to its colours. colour=True adds the mean colour and takes the histograms per
    channel instead. Centred over the image's patches and not normalised per patch (the cosine loss does that): non-
    negative targets would let a constant prediction score cos ~0.7, and a flat patch's direction would be its noise.
    Not the paper's teacher."""

    def __init__(self, patch_size, bins=9, colour=False):
        super().__init__()
        self.p, self.bins, self.colour = patch_size, bins, colour
        sobel = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]])
        self.register_buffer('kernel', torch.stack([sobel, sobel.t()])[:, None].repeat(3, 1, 1, 1))

    def forward(self, images):                                     # (B, 3, H, W) in [0, 1]
        g = F.conv2d(F.pad(images, (1, 1, 1, 1), mode='reflect'), self.kernel, groups=3)
        gx, gy = g[:, 0::2], g[:, 1::2]                             # (B, 3, H, W) each
        mag = torch.hypot(gx, gy)
        if not self.colour:                                         # the strongest channel per pixel
            top = mag.argmax(1, keepdim=True)
            gx, gy, mag = gx.gather(1, top), gy.gather(1, top), mag.gather(1, top)  # (B, 1, H, W)
        b = (torch.atan2(gy, gx) % torch.pi) / torch.pi * self.bins  # soft-assign to 2 nearest bins
        lo, frac = b.floor().long() % self.bins, b - b.floor()
        hist = F.one_hot(lo, self.bins) * (1 - frac)[..., None] + \
            F.one_hot((lo + 1) % self.bins, self.bins) * frac[..., None]
        hist = (hist * mag[..., None]).permute(0, 1, 4, 2, 3).flatten(1, 2)  # (B, c*bins, H, W)
        cells = F.avg_pool2d(hist, self.p // 2)                     # 2x2 cells per patch
        n, c, h, w = cells.shape
        f = cells.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).flatten(3)  # (n, h/2, w/2, 4c)
        if self.colour:
            f = torch.cat([f, F.avg_pool2d(images, self.p).permute(0, 2, 3, 1)], -1)  # + mean colour
        f = f.flatten(1, 2)                                         # (B, patches, features)
        return f - f.mean(1, keepdim=True)  # centred per image: a constant guess scores cos 0


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class CLIPBlock(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)   # CLIP: eps 1e-5
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(d, 4 * d), gelu=QuickGELU(), c_proj=nn.Linear(4 * d, d)))

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
        self.transformer.resblocks = nn.ModuleList(CLIPBlock(width, width // 64) for _ in range(layers))
        self.proj = nn.Parameter(torch.zeros(width, out_dim))

    @staticmethod
    def from_state(sd):
        sd = {k[len('visual.'):]: v for k, v in sd.items() if k.startswith('visual.')}
        if 'conv1.weight' not in sd:
            common.die('CLIP teacher: no visual.conv1.weight in the weights file')
        w = sd['conv1.weight']
        layers = len({k.split('.')[2] for k in sd if k.startswith('transformer.resblocks.')})
        grid = int((sd['positional_embedding'].shape[0] - 1) ** 0.5)
        model = CLIPVisual(w.shape[0], layers, w.shape[-1], grid, sd['proj'].shape[1])
        model.load_state_dict({k: v.float() for k, v in sd.items()})
        return model

    def forward(self, images):                                     # [0, 1] -> (B, n, out_dim)
        x = self.conv1(data.normalize(images.clone(), self.mean, self.std)).flatten(2).transpose(1, 2)
        x = self.ln_pre(torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], 1) + self.positional_embedding)
        for blk in self.transformer.resblocks:
            x = blk(x)
        return self.ln_post(x)[:, 1:] @ self.proj


class _Scripted:  # an object of a TorchScript archive, rebuilt as plain attributes (its code never runs)
    def __setstate__(self, state):
        self.__dict__.update(state if isinstance(state, dict) else {})


SAFE_TORCHSCRIPT_GLOBALS = {('torch._utils', '_rebuild_tensor_v2'), ('collections', 'OrderedDict'),
                            ('torch.jit._pickle', 'restore_type_tag'), ('torch.jit._pickle', 'build_intlist'),
                            ('torch.jit._pickle', 'build_doublelist'), ('torch.jit._pickle', 'build_boollist')}


def read_torchscript(path):
    """The tensors of a TorchScript archive (OpenAI's ViT-B-16.pt), name -> tensor, read from its pickled
    data by an unpickler that knows only tensors and plain containers: torch.jit.load would run the
    archive's code (__setstate__ and the like); this runs none of it."""
    archive = zipfile.ZipFile(path)
    prefix = next(n for n in archive.namelist() if n.endswith('/data.pkl'))[:-len('data.pkl')]

    class Reader(pickle.Unpickler):
        def find_class(self, module, name):
            if module.split('.')[0] == '__torch__':  # the archive's own classes: attributes only
                return _Scripted
            if (module, name) in SAFE_TORCHSCRIPT_GLOBALS:  # tensors, containers, type tags: data, not code
                return getattr(importlib.import_module(module), name)
            if module == 'torch' and name.endswith('Storage'):
                return getattr(torch, name)
            raise pickle.UnpicklingError(f'{path}: refused to load: it would call {module}.{name}')

        def persistent_load(self, pid):  # ('storage', storage type, key, location, size)
            raw = torch.frombuffer(bytearray(archive.read(f'{prefix}data/{pid[2]}')), dtype=torch.uint8)
            return torch.storage.TypedStorage(wrap_storage=raw.untyped_storage(), dtype=pid[1].dtype, _internal=True)

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
            common.die(f'CLIP teacher: {path}: no such file')
        names = zipfile.ZipFile(path).namelist() if zipfile.is_zipfile(path) else []
        scripted = any(n.endswith('/constants.pkl') for n in names)  # TorchScript, not a torch.save file
        try:
            sd = read_torchscript(path) if scripted else beitv2.state_dict_of(common.read_checkpoint(path))
        except (pickle.UnpicklingError, ValueError) as e:
            common.die(str(e))
        return CLIPVisual.from_state(sd)
    try:
        import open_clip
        model = open_clip.create_model('ViT-B-16', pretrained='openai')
    except Exception as e:  # not installed, or no network
        common.die(f'CLIP teacher: pass --teacher_weights=ViT-B-16.pt (OpenAI file) ({e})')
    return CLIPVisual.from_state(model.state_dict())


class DINOTeacher(nn.Module):
    """DINO ViT-B/16 (LayerNorm eps 1e-6, exact GELU): final norm of the patch tokens."""

    def __init__(self, sd):
        super().__init__()
        D = sd['cls_token'].shape[-1]
        depth = len({k.split('.')[1] for k in sd if k.startswith('blocks.')})
        p = sd['patch_embed.proj.weight'].shape[-1]
        grid = int((sd['pos_embed'].shape[1] - 1) ** 0.5)
        self.vit = beitv2.ViT(beitv2.ViTConfig(img_size=grid * p, patch_size=p, embed_dim=D, depth=depth,
                                               num_heads=D // 64, layer_scale=0.0, abs_pos_emb=True, rel_pos='none'))
        for k in [k for k in sd if k.endswith('attn.qkv.bias')]:
            q, _, v = sd.pop(k).chunk(3)  # the k bias adds a per-query constant: softmax ignores it
            sd[k.replace('qkv.bias', 'q_bias')], sd[k.replace('qkv.bias', 'v_bias')] = q, v
        beitv2.load_state(self.vit, sd)

    def forward(self, images):
        return self.vit.forward_patch_tokens(data.normalize(images.clone()))


def load_dino(path):
    if path:
        sd = beitv2.state_dict_of(common.read_checkpoint(path))
    else:
        try:
            sd = torch.hub.load('facebookresearch/dino:main', 'dino_vitb16').state_dict()
        except Exception as e:  # no network, or not a DINO hub
            common.die(f'DINO teacher: pass --teacher_weights=dino_vitbase16_pretrain.pth ({e})')
    for pre in ('module.', 'backbone.', 'teacher.'):
        sd = {k[len(pre):] if k.startswith(pre) else k: v for k, v in sd.items()}
    return DINOTeacher({k: v for k, v in sd.items() if not k.startswith('head.')})


def build_teacher(cfg):
    """Frozen, eval mode; called under no_grad. -> module mapping [0, 1] images to (B, n, C)."""
    try:
        t = (HOGTeacher(cfg.patch_size, colour=cfg.teacher == 'hog_colour') if cfg.teacher.startswith('hog') else
             load_clip(cfg.teacher_weights) if cfg.teacher == 'clip' else load_dino(cfg.teacher_weights))
    except (ValueError, KeyError, RuntimeError) as e:  # weights of another model, or of another layout
        common.die(f'--teacher={cfg.teacher} --teacher_weights={cfg.teacher_weights}: {" ".join(str(e).split())[:300]}')
    return t.eval().requires_grad_(False)

# ----------------------------------------------------------------------------- training


@torch.no_grad()
def validate(model, teacher, val, cfg, env):
    """Reconstruction loss and codebook usage over the val split (centre crops), all ranks together."""
    model.eval()
    shard = torch.utils.data.Subset(data.Mapped(val, data.eval_transform(cfg.img_size, normalize=False)),
                                    range(env.rank, len(val), env.world))
    counts = torch.zeros(cfg.codebook_size, device=env.device)
    total = torch.zeros(2, device=env.device, dtype=torch.float64)  # sum of per-image losses, images
    for images, _ in torch.utils.data.DataLoader(shard, cfg.batch_size, num_workers=cfg.workers):
        images = images.to(env.device)
        with env.autocast():
            _, codes, losses = model(images, teacher(images))
        counts += torch.bincount(codes.flatten(), minlength=cfg.codebook_size)
        total += torch.tensor([losses['rec_loss'].item() * len(images), len(images)], device=env.device)
    usage = common.code_usage(env.all_reduce(counts))
    loss, n = env.all_reduce(total).tolist()
    return dict(rec_loss=loss / n, unused_codes=usage['unused'], perplexity=usage['perplexity'])


def main(argv=None):
    cfg = common.configure(Config(), PRESETS, argv)
    if cfg.img_size % cfg.patch_size or cfg.patch_size % 2:
        common.die(f'img_size {cfg.img_size} must be divisible by patch_size {cfg.patch_size} (even)')
    if cfg.batch_size * (cfg.img_size // cfg.patch_size) ** 2 < cfg.codebook_size:
        common.die(f'k-means init needs at least codebook_size={cfg.codebook_size} patch vectors in the first batch; '
                   f'{cfg.batch_size} images give {cfg.batch_size * (cfg.img_size // cfg.patch_size) ** 2}: '
                   'raise --batch_size or lower --codebook_size')
    env = common.Env(cfg)
    dataset = data.build_dataset(cfg.data, 'train', cfg.img_size)
    val = data.build_dataset(cfg.data, 'val', cfg.img_size) if cfg.eval_every else None
    teacher = build_teacher(cfg).to(env.device)
    with torch.no_grad():
        probe = teacher(torch.zeros(1, 3, cfg.img_size, cfg.img_size, device=env.device))
    grid = cfg.img_size // cfg.patch_size
    if probe.shape[1] != grid * grid:
        common.die(f'teacher gives {probe.shape[1]} tokens, the tokenizer {grid * grid}: match img_size/patch_size')
    mcfg = common.model_config(cfg, teacher_dim=probe.shape[-1])
    model = beitv2.VQKD(mcfg).to(env.device)
    optimizer = torch.optim.AdamW(common.param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas,
                                  fused=True)  # fused: one kernel for all parameters
    counts = torch.zeros(cfg.codebook_size, dtype=torch.long, device=env.device)  # codes since the last log

    def step(run, batch):
        images = data.to_device(batch[0][0], env.device)
        with torch.no_grad():
            target = teacher(images)
        _, codes, losses = run(images, target)
        counts.index_add_(0, codes.flatten(), torch.ones_like(codes.flatten()))
        return losses['loss'], dict(rec_loss=losses['rec_loss'].detach(), quant_loss=losses['quant_loss'].detach())

    def at_log():  # the codes used since the last log line, on all ranks
        usage = common.code_usage(env.all_reduce(counts))
        counts.zero_()
        return dict(unused_codes=usage['unused'], perplexity=usage['perplexity'])
    peak = cfg.lr * cfg.batch_size * cfg.accum * env.world / 128  # official: lr scaled by the effective batch
    # the codebook is a buffer kept in sync by its own all-reduces, not by DDP broadcasts
    common.fit(cfg, env, model, optimizer, dataset, data.Crops((cfg.img_size,), cfg.min_crop_scale), step,
               None if val is None else lambda m: validate(m, teacher, val, cfg, env), 'rec_loss', higher=False,
               lr=peak, inputs=('teacher_weights',), model_config=asdict(mcfg), sync_buffers=False, at_log=at_log)
    env.close()
    return model

if __name__ == '__main__':
    main()
