"""Benchmark BEiT v2 training steps: median ms/step, images/s, TFLOP/s, MFU, peak memory.

    python bench.py                            # the student and full steps, ViT-Tiny/16, batch 8
    python bench.py --official=/scratch/beit2  # alternating with the official model (timm, einops)
    python bench.py --what=loader --workers=4  # images/s of pretrain.py's data path, demo data
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
import data
import engine
import settings
from settings import at_least, die, half_open, one_of


@dataclass
class Config:
    preset: str = 'cpu'  # the only one: the settings below
    # a pretraining model of beitv2.PRESETS: beitv2_base_patch16_224, ...
    model: str = 'beitv2_tiny_patch16_224'
    img_size: int = at_least(1, 224)  # the input size
    batch_size: int = at_least(1, 8)  # images per step
    # our step's autocast dtype (the official step: fp32 on a CPU, fp16 on CUDA, its recipe)
    dtype: str = one_of('fp32', 'bf16', 'fp16')
    compile: bool = False  # torch.compile our step (the official one stays eager)
    device: str = ''  # '' = cuda if there is one
    steps: int = at_least(1, 10)  # timed steps per side, after the warmup
    warmup: int = at_least(0, 3)  # untimed steps first
    # pretrain: the training step | loader: a stage's data path, files to tensors on the device
    what: str = one_of('pretrain', 'loader')
    data: str = 'demo'  # loader: demo, demo:N or an image folder
    # loader: the stage whose data path is timed
    transform: str = one_of('pretrain', 'tokenizer', 'finetune')
    # the official beit2/ folder: its step (or its DataAugmentationForBEiT) beside ours
    official: str = ''
    peak_tflops: float = 0.0  # the device's peak, for the MFU column; 0 = no MFU
    seed: int = half_open(0, 0, 2 ** 32)  # the models' init and the inputs
    workers: int = at_least(0, 4)  # loader: DataLoader processes
    profile: bool = False  # pretrain: a kernel table of 3 of our full steps


PRESETS = {'cpu': {}}


def flops_per_image(m, t, n_mask):
    """Matmul FLOPs per image of each step, 2 per multiply-add, backward = 2x forward (m: the
    student's config, t: the tokenizer's)."""
    n, D, p, d = (m.img_size // m.patch_size) ** 2, m.embed_dim, m.patch_size, t.code_dim

    def blocks(depth):  # qkv + proj, mlp, the two attention matmuls, over n + 1 tokens
        return depth * (n + 1) * (2 * (4 + 2 * m.mlp_ratio) * D * D + 2 * 2 * (n + 1) * D)
    embed = 2 * n * 3 * p * p * D  # the patch embedding
    task_and_codes = 2 * n * (D * D + D * d + d * t.codebook_size)
    lm_heads = 2 * 2 * n_mask * D * m.vocab_size  # on the masked patches of both branches
    return dict(student=3 * (blocks(m.depth + m.head_layers) + embed + lm_heads),
                encode=blocks(t.depth) + embed + task_and_codes)


def official(root, module):  # a module of the official beit2/ folder, unedited
    sys.path.insert(0, root)
    with contextlib.redirect_stdout(io.StringIO()):  # some print as they load
        try:
            return __import__(module)
        except ImportError as e:
            die(f'--official={root}: cannot import its {module}.py (needs timm, einops): {e}')


def official_model(root, m):
    """root/modeling_pretrain.py's model; stubbed: utils (torch._six), vqkd_teacher (downloads)."""
    sys.modules.setdefault('utils', types.ModuleType('utils'))
    stub = sys.modules.setdefault('vqkd_teacher', types.ModuleType('vqkd_teacher'))
    stub.clip, stub.get_dino_vit_base = types.SimpleNamespace(load=None), None
    with contextlib.redirect_stdout(io.StringIO()):  # it prints as it builds
        return official(root, 'modeling_pretrain').VisionTransformerForMaskedImageModelingCLS(
            img_size=m.img_size, patch_size=m.patch_size, vocab_size=m.vocab_size,
            embed_dim=m.embed_dim, depth=m.depth, num_heads=m.num_heads, init_values=m.layer_scale,
            norm_layer=lambda dim: torch.nn.LayerNorm(dim, eps=1e-6), use_abs_pos_emb=False,
            use_shared_rel_pos_bias=True, early_layers=m.early_layers, head_layers=m.head_layers)


def make_step(model, images, mask, targets, amp, num_masked=None, encode=None, official=False):
    """A closure: one student step as the official engine (CE of both heads summed, under autocast
    unless amp is None; backward, clip 3.0, AdamW) -> its loss. encode() makes the targets (the full
    step); official: an official model."""
    opt = torch.optim.AdamW(engine.param_groups(model, 0.05), lr=1.5e-3, betas=(0.9, 0.999),
                            fused=not official)
    env = types.SimpleNamespace(scaler=torch.amp.GradScaler(images.device.type,
                                                            enabled=amp == torch.float16))
    model.train()

    def step():
        codes = targets
        if encode:
            with torch.no_grad():
                codes = encode()
        with torch.autocast(images.device.type, dtype=amp, enabled=amp is not None):
            if official:
                loss = sum(F.cross_entropy(x.float(), codes[mask])
                           for x in model(images, bool_masked_pos=mask))
            else:
                loss = model(images, mask, codes, num_masked=num_masked)[1]['loss']
        env.scaler.scale(loss).backward()
        engine.optimizer_step(env, opt, 3.0)
        return loss.item()
    return step


def measure(fns, flops, cfg, device):
    """Alternate the named closures (each returns a float: the device has finished) step by step; a
    line each (ms/step, img/s, TFLOP/s, MFU, peak memory). -> [(median ms, first loss)]"""
    cuda = device.type == 'cuda'
    times, first, peak = {name: [] for name in fns}, {}, dict.fromkeys(fns, 0.0)
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
        med = statistics.median(ms)
        line = f'{name:30s} {med:9.1f} ms/step  {cfg.batch_size / med * 1000:8.1f} img/s'
        if flops:
            tflops = flops * cfg.batch_size / med / 1e9
            line += f'  {tflops:8.2f} TFLOP/s'
            if cfg.peak_tflops:
                line += f'  MFU {tflops / cfg.peak_tflops:6.1%}'
        if peak[name]:
            line += f'  peak {peak[name]:.0f} MiB'
        print(line + f'  (min {min(ms):.1f}, max {max(ms):.1f}, n={len(ms)})', flush=True)
        out.append((med, first[name]))
    return out


def bench_pretrain(cfg, env, m, masker):
    """The student step, ours and the official one alternating; then our full step (+ the
    targets)."""
    g, S, b = torch.Generator().manual_seed(cfg.seed), m.img_size, cfg.batch_size
    images = torch.randn(b, 3, S, S, generator=g).to(env.device)      # normalised
    tok_images = torch.rand(b, 3, S, S, generator=g).to(env.device)   # the tokenizer's, in [0, 1]
    targets = torch.randint(0, m.vocab_size, (b, masker.h * masker.w), generator=g).to(env.device)
    mask = torch.stack([masker() for _ in range(b)]).to(env.device)
    model = beitv2.BEiTv2(m).to(env.device)
    run = torch.compile(model) if cfg.compile else model
    t = beitv2.VQKDConfig(img_size=S, patch_size=m.patch_size, embed_dim=m.embed_dim,
                          depth=min(m.depth, 12), num_heads=m.num_heads, decoder_depth=1,
                          codebook_size=m.vocab_size)  # a tokenizer for the targets
    flops = flops_per_image(m, t, masker.num)
    fns = {'ours: student step': make_step(run, images, mask, targets, env.amp_dtype, masker.num)}
    if cfg.official:
        off = official_model(cfg.official, m).to(env.device)
        off.load_state_dict(beitv2.export_state(model))  # the same starting weights as ours
        amp = torch.float16 if env.device.type == 'cuda' else None  # the official recipe
        fns['official: student step'] = make_step(off, images, mask, targets, amp, official=True)
    (ours, first), *theirs = measure(fns, flops['student'], cfg, env.device)
    for official_ms, official_first in theirs:
        print(f'first losses: ours {first:.6f}, official {official_first:.6f}\n'
              f'ours/official median step time: {ours / official_ms:.3f}', flush=True)
    tokenizer = beitv2.VQKD(t).to(env.device).eval()
    encode = torch.compile(tokenizer.encode) if cfg.compile else tokenizer.encode

    def targets_of_the_step():  # in the precision pretrain.py computes its targets in
        with env.target_autocast():
            return encode(tok_images)
    step = make_step(run, images, mask, None, env.amp_dtype, masker.num, targets_of_the_step)
    measure({'ours: full step (+ encode)': step}, flops['student'] + flops['encode'], cfg,
            env.device)
    if cfg.profile:  # where the time of 3 full steps goes, kernel by kernel, slowest first
        with torch.profiler.profile(activities=torch.profiler.supported_activities()) as prof:
            for _ in range(3):
                step()
        key = 'self_device_time_total' if env.device.type == 'cuda' else 'self_cpu_time_total'
        print(prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=90),
              flush=True)


def bench_loader(cfg, env, masker):
    """A stage's data path, files to tensors on the device: --data through --transform in the
    training loader, then the step's first lines (uint8 to floats). --official: then the official
    DataAugmentationForBEiT, the same way."""
    S, dataset = cfg.img_size, data.build_dataset(cfg.data, 'train', cfg.img_size, labels=False)
    transforms = dict(pretrain=data.Crops((S, S), 0.2, 0.4, masker),
                      tokenizer=data.Crops((S,), 0.08),
                      finetune=data.TrainTransform(S, 0.08, randaug=True, reprob=0.25))
    sides = {f'ours: {cfg.transform}': transforms[cfg.transform]}
    if cfg.official:  # root/datasets.py's, at the recipe's settings (PRETRAINING.md)
        args = types.SimpleNamespace(
            imagenet_default_mean_and_std=True, input_size=S, second_input_size=S,
            min_crop_scale=0.2, train_interpolation='bicubic', second_interpolation='bicubic',
            window_size=(masker.h,) * 2, num_mask_patches=masker.num,
            max_mask_patches_per_block=None, min_mask_patches_per_block=masker.min_num)
        official_views = official(cfg.official, 'datasets').DataAugmentationForBEiT(args)
        sides['official: DataAugmentationForBEiT'] = lambda item, rng: official_views(item[0])
    warm = replace(cfg, warmup=cfg.warmup + 2 * cfg.workers)  # past the batches prefetched at start
    for name, transform in sides.items():  # one after the other: the other side's workers stay idle
        batches = engine.stream(data.make_loader(dataset, transform, cfg, env), 0, 1)

        def read(batches=batches):  # the step's first lines, every value read as a step would
            batch = next(batches)
            total = 0.0
            for t in (batch.values() if isinstance(batch, dict) else batch):
                if t.dtype == torch.uint8:  # a view: floats in [0, 1], then ImageNet's mean and std
                    t = data.normalize(data.to_device(t, env.device))
                total += t.to(env.device).float().sum().item()
            return total
        (ms, _), = measure({name: read}, 0, warm, env.device)
        per_image = ms / cfg.batch_size * max(cfg.workers, 1)
        print(f'  {per_image:.2f} ms per image per worker', flush=True)
        del batches, read  # its loader's workers end


def main(argv=None):
    cfg = settings.configure(Config(), PRESETS, argv)
    if not isinstance(beitv2.PRESETS[cfg.model], beitv2.BEiTConfig):
        die(f'--model={cfg.model} is a tokenizer; bench.py times the pretraining model '
            '(a beitv2_*)')
    env = engine.Env(cfg.device, cfg.dtype, cfg.seed)  # as the stage scripts: dtype, seeds, no TF32
    name = torch.cuda.get_device_name(env.device) if env.device.type == 'cuda' else 'cpu'
    m = replace(beitv2.PRESETS[cfg.model], img_size=cfg.img_size)
    masker = beitv2.MaskingGenerator((cfg.img_size // m.patch_size,) * 2)
    print(f'torch {torch.__version__}, {name}, {torch.get_num_threads()} threads, ours {cfg.dtype}'
          f'{" + compile" if cfg.compile else ""}, batch {cfg.batch_size}', flush=True)
    if cfg.what == 'pretrain':
        bench_pretrain(cfg, env, m, masker)
    else:
        bench_loader(cfg, env, masker)


if __name__ == '__main__':
    main()
