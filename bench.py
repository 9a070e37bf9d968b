"""Benchmark BEiT v2 training steps: median ms/step, images/s, TFLOP/s, MFU, peak memory.

    python bench.py                              # the student and full steps, ViT-Tiny/16, batch 8, fp32
    python bench.py --official=/scratch/beit2    # alternate with the official model (needs timm, einops)
    python bench.py --what=loader --workers=4    # images/s of pretrain.py's data path on the demo data
gpu_check.sh runs the GPU set: ViT-B/16, bf16, compile, beside the official model.
"""
import contextlib
import io
import statistics
import sys
import time
import types
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

import beitv2
import common
import data
import evaluate

@dataclass
class Config:
    preset: str = 'cpu'             # the only one: the settings below
    model: str = 'beitv2_tiny_patch16_224'  # a BEiTConfig of beitv2.PRESETS: ..._base_..., ..._large_...
    img_size: int = common.at_least(1, 224)
    batch_size: int = common.at_least(1, 8)
    dtype: str = common.one_of('fp32', 'bf16', 'fp16')  # ours: the autocast dtype
    compile: bool = False           # torch.compile our step (the official one stays eager)
    device: str = ''            # '' = cuda if available
    steps: int = common.at_least(1, 10)  # timed steps per side, after the warmup
    warmup: int = common.at_least(0, 3)
    what: str = common.one_of('pretrain', 'loader')
    data: str = 'demo'              # loader: demo, demo:N or an ImageNet-layout folder
    transform: str = common.one_of('pretrain', 'tokenizer', 'finetune')  # loader: the stage whose data path
    official: str = ''          # the official beit2/ folder: its student step alternates with ours
    peak_tflops: float = 0.0    # the device's peak for MFU; 0 = PEAKS for a known GPU, else no MFU
    seed: int = common.within(0, 0, 2 ** 32, ')')  # the models' init and the inputs
    workers: int = common.at_least(0, 4)  # the loader's DataLoader processes
    profile: bool = False       # pretrain: a kernel table of 3 of our full steps

PRESETS = {'cpu': {}}
PEAKS = {'H100': 989.0, 'H200': 989.0, 'A100': 312.0, 'L40S': 362.0, 'A10': 125.0}  # dense bf16 TFLOP/s

def flops_per_image(m, t, n_mask):
    """Matmul FLOPs per image of each step, 2 per multiply-add, backward = 2x forward (t: of m's width)."""
    n, D, p, d = (m.img_size // m.patch_size) ** 2, m.embed_dim, m.patch_size, t.code_dim

    def blocks(depth):  # qkv + proj, mlp, the two attention matmuls, over n + 1 tokens
        return depth * (n + 1) * (2 * (4 + 2 * m.mlp_ratio) * D * D + 2 * 2 * (n + 1) * D)
    embed = 2 * n * 3 * p * p * D  # the patch embedding
    enc = blocks(t.depth) + embed + 2 * n * (D * D + D * d + d * t.codebook_size)  # + task layer, codebook
    lm_heads = 2 * 2 * n_mask * D * m.vocab_size  # on the masked patches of both branches
    return dict(student=3 * (blocks(m.depth + m.head_layers) + embed + lm_heads), encode=enc)

def official(root, module):  # a module of the official beit2/ folder, unedited
    sys.path.insert(0, root)
    with contextlib.redirect_stdout(io.StringIO()):  # some print as they load
        try:
            return __import__(module)
        except ImportError as e:
            common.die(f'--official={root}: cannot import its {module}.py (needs timm, einops): {e}')

def official_model(root, cfg):
    """root/modeling_pretrain.py's model; stubbed: utils (torch._six), vqkd_teacher (downloads)."""
    sys.modules.setdefault('utils', types.ModuleType('utils'))
    stub = sys.modules.setdefault('vqkd_teacher', types.ModuleType('vqkd_teacher'))
    stub.clip, stub.get_dino_vit_base = types.SimpleNamespace(load=None), None
    with contextlib.redirect_stdout(io.StringIO()):  # it prints as it builds
        return official(root, 'modeling_pretrain').VisionTransformerForMaskedImageModelingCLS(
            img_size=cfg.img_size, patch_size=cfg.patch_size, vocab_size=cfg.vocab_size,
            embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads, init_values=cfg.layer_scale,
            norm_layer=lambda dim: torch.nn.LayerNorm(dim, eps=1e-6), use_abs_pos_emb=False,
            use_shared_rel_pos_bias=True, early_layers=cfg.early_layers, head_layers=cfg.head_layers)

def make_step(model, images, mask, targets, amp=None, num_masked=None, encode=None, tok_images=None, official=False):
    """A closure that runs one student step as the official engine (CE of both heads summed, under autocast
    unless amp is None; backward, clip 3.0, AdamW) and returns the loss. encode(tok_images) makes the targets
    (the full step); official: an official model."""
    opt = torch.optim.AdamW(common.param_groups(model, 0.05), lr=1.5e-3, betas=(0.9, 0.999), fused=not official)
    env = types.SimpleNamespace(scaler=torch.amp.GradScaler(images.device.type, enabled=amp == torch.float16))
    model.train()

    def step():
        with torch.no_grad():
            codes = targets if encode is None else encode(tok_images)
        with torch.autocast(images.device.type, dtype=amp, enabled=amp is not None):
            if official:
                loss = sum(F.cross_entropy(x.float(), codes[mask]) for x in model(images, bool_masked_pos=mask))
            else:
                loss = model(images, mask, codes, num_masked=num_masked)[1]['loss']
        env.scaler.scale(loss).backward()
        common.optimizer_step(env, opt, 3.0)
        return loss.item()
    return step

def measure(fns, flops, cfg, c):
    """Alternate the named closures (each returns a float: the device has finished) step by step; a line each
    (ms/step, img/s, TFLOP/s, MFU, peak memory) -> [(median ms, first loss)]"""
    cuda, times, first, peak = c.device.type == 'cuda', {name: [] for name in fns}, {}, dict.fromkeys(fns, 0.0)
    for i in range(cfg.warmup + cfg.steps):
        for name, fn in fns.items():
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            first.setdefault(name, fn())
            if cuda:
                torch.cuda.synchronize()
                peak[name] = max(peak[name], torch.cuda.max_memory_allocated() / 2 ** 20)
            if i >= cfg.warmup:
                times[name].append((time.perf_counter() - t0) * 1000)
    out = []
    for name, ms in times.items():
        med, mem = statistics.median(ms), peak[name]
        tf = flops * cfg.batch_size / med / 1e9
        line = f'{name:30s} {med:9.1f} ms/step  {cfg.batch_size / med * 1000:8.1f} img/s'
        line += f'  {tf:8.2f} TFLOP/s' + (f'  MFU {tf / c.peak:6.1%}' if c.peak else '') if flops else ''
        line += f'  peak {mem:.0f} MiB' if mem else ''
        print(line + f'  (min {min(ms):.1f}, max {max(ms):.1f}, n={len(ms)})', flush=True)
        out.append((med, first[name]))
    return out

def inputs(b, c):  # b images (normalised), their block masks, random codes, the tokenizer's [0, 1] view
    g, S = torch.Generator().manual_seed(c.seed), c.mcfg.img_size
    images, tok_images = torch.randn(b, 3, S, S, generator=g), torch.rand(b, 3, S, S, generator=g)
    targets = torch.randint(0, c.mcfg.vocab_size, (b, c.n), generator=g)
    return [t.to(c.device) for t in (images, torch.stack([c.masker() for _ in range(b)]), targets, tok_images)]

def bench_pretrain(cfg, c):  # the student step, ours and the official one alternating, then the full step
    images, mask, targets, tok_images = inputs(cfg.batch_size, c)
    model = beitv2.BEiTv2(c.mcfg).to(c.device)
    run = c.compile(model)
    fns = {'ours: student step': make_step(run, images, mask, targets, c.amp, c.masker.num)}
    if cfg.official:
        off = official_model(cfg.official, c.mcfg).to(c.device)
        off.load_state_dict(beitv2.export_state(model))  # the same starting weights as ours
        fns['official: student step'] = make_step(off, images, mask, targets, c.official_amp, official=True)
    (ours, first), *official = measure(fns, c.flops['student'], cfg, c)
    for theirs, first_official in official:
        print(f'first losses: ours {first:.6f}, official {first_official:.6f}\n'
              f'ours/official median step time: {ours / theirs:.3f}', flush=True)
    encode_fn = c.compile(beitv2.VQKD(c.tcfg).to(c.device).eval().encode)

    def encode(x):  # in the precision pretrain.py computes its targets in
        with c.env.target_autocast():
            return encode_fn(x)
    step = make_step(run, images, mask, None, c.amp, c.masker.num, encode, tok_images)
    measure({'ours: full step (+ encode)': step}, c.flops['student'] + c.flops['encode'], cfg, c)
    if cfg.profile:  # where the time of 3 full steps goes, kernel by kernel, slowest first
        with torch.profiler.profile(activities=torch.profiler.supported_activities()) as prof:
            for _ in range(3):
                step()
        key = 'self_device_time_total' if c.device.type == 'cuda' else 'self_cpu_time_total'
        print(prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=90), flush=True)

def bench_loader(cfg, c):
    """A stage's data path, files to tensors on the device: --data through --transform in the training loader, then
    the step's first lines (uint8 to floats). --official: then the official DataAugmentationForBEiT, the same way."""
    S, dataset = cfg.img_size, data.build_dataset(cfg.data, 'train', cfg.img_size)
    transforms = dict(pretrain=lambda: data.Crops((S, S), 0.2, 0.4, c.masker), tokenizer=lambda: data.Crops((S,), 0.08),
                      finetune=lambda: evaluate.TrainTransform(replace(evaluate.Config(), img_size=S), finetune=True))
    sides = {f'ours: {cfg.transform}': transforms[cfg.transform]()}
    if cfg.official:  # root/datasets.py's, at the recipe's settings (PRETRAINING.md)
        args = types.SimpleNamespace(imagenet_default_mean_and_std=True, input_size=S, second_input_size=S,
                                     min_crop_scale=0.2, train_interpolation='bicubic', second_interpolation='bicubic',
                                     window_size=(c.masker.h,) * 2, num_mask_patches=c.masker.num,
                                     max_mask_patches_per_block=None, min_mask_patches_per_block=c.masker.min_num)
        official_views = official(cfg.official, 'datasets').DataAugmentationForBEiT(args)
        sides['official: DataAugmentationForBEiT'] = lambda img, rng: official_views(img)
    warm = replace(cfg, warmup=cfg.warmup + 2 * cfg.workers)  # past the batches the workers prefetched at start

    def to_device(batch):  # the step's first lines, as pretrain.py's: a view in [0, 1], then normalised in place
        return [data.normalize(data.to_device(v, c.device)) if v.dtype == torch.uint8 else v.to(c.device)
                for v in (batch if isinstance(batch, list) else [batch])]  # finetune: floats already
    for name, transform in sides.items():  # one after the other: the other side's workers stay idle
        loader, sampler = data.make_loader(dataset, transform, cfg.batch_size, cfg.workers, cfg.seed, c.env)
        batches = data.stream(loader, sampler, 0, len(loader), 1)
        read = lambda: sum(t.sum().item() for t in to_device(next(batches)[0]))  # every page read, as a step would
        (ms, _), = measure({name: read}, 0, warm, c)
        print(f'  {ms / cfg.batch_size * max(cfg.workers, 1):.2f} ms per image per worker', flush=True)
        del batches, loader  # its workers end

def main(argv=None):
    cfg = common.configure(Config(), PRESETS, argv)
    if not isinstance(beitv2.PRESETS[cfg.model], beitv2.BEiTConfig):
        common.die(f'--model={cfg.model} is a tokenizer; bench.py times the pretraining model (a beitv2_*)')
    env = common.Env(cfg)  # as the stage scripts: device, autocast dtype, seeds, no TF32
    name = torch.cuda.get_device_name(env.device) if env.device.type == 'cuda' else 'cpu'
    m = replace(beitv2.PRESETS[cfg.model], img_size=cfg.img_size)
    masker = beitv2.MaskingGenerator((cfg.img_size // m.patch_size,) * 2)
    tcfg = beitv2.VQKDConfig(img_size=cfg.img_size, patch_size=m.patch_size, embed_dim=m.embed_dim,  # the targets
                             depth=min(m.depth, 12), num_heads=m.num_heads, decoder_depth=1, codebook_size=m.vocab_size)
    c = types.SimpleNamespace(  # what the benchmarks share
        env=env, device=env.device, amp=env.amp_dtype, seed=cfg.seed, mcfg=m, tcfg=tcfg,
        masker=masker, n=masker.h * masker.w, flops=flops_per_image(m, tcfg, masker.num),
        official_amp=torch.float16 if env.device.type == 'cuda' else None,  # the official recipe
        compile=torch.compile if cfg.compile else (lambda fn: fn),
        peak=cfg.peak_tflops or next((v for k, v in PEAKS.items() if k in name), 0.0))
    print(f'torch {torch.__version__}, {name}, {torch.get_num_threads()} threads, ours {cfg.dtype}'
          f'{" + compile" if cfg.compile else ""}, batch {cfg.batch_size}, peak {c.peak or "unknown"} TFLOP/s')
    dict(pretrain=bench_pretrain, loader=bench_loader)[cfg.what](cfg, c)

if __name__ == '__main__':
    main()
