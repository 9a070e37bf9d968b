"""Benchmark BEiT v2 training steps: ms/step, images/s, peak memory, model FLOP utilisation.

    python bench.py                                     # ViT-Tiny/16 at 224, batch 8, this CPU, fp32
    python bench.py --dtype=bf16                        # bf16 autocast (codebook and losses in fp32)
    python bench.py --official=/scratch/beit2           # alternate with the official model, same process
    python bench.py --model=beitv2_base_patch16_224 --batch_size=128 --dtype=bf16 --compile=True   # a GPU
    python bench.py --what=maxbatch --model=beitv2_base_patch16_224 --dtype=bf16 --official=...  # largest batches
gpu_check.sh runs the GPU set (tests on CUDA, these benchmarks, torchrun) in one go.
The official side needs the official beit2/ folder (microsoft/unilm) outside this repository,
and timm + einops installed; it runs fp32 on CPU and fp16 autocast + GradScaler on CUDA, as the
official scripts do. Both sides start from the same weights and see the same batch, so their
first losses agree. FLOPs: matmuls only (2 per multiply-add), backward = 2x forward.
"""
import contextlib
import dataclasses
import functools
import importlib
import io
import os
import resource
import statistics
import sys
import time
import types
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import beitv2
import common


@dataclass
class Config:
    preset: str = 'cpu'
    model: str = 'beitv2_tiny_patch16_224'  # a BEiTConfig of beitv2.PRESETS: ..._base_..., ..._large_...
    img_size: int = 224
    batch_size: int = 8
    dtype: str = 'fp32'         # ours: fp32 | bf16 | fp16 (autocast)
    compile: bool = False
    device: str = ''            # '' = cuda if available
    steps: int = 10             # timed steps per side (after warmup)
    warmup: int = 3
    what: str = 'pretrain'      # pretrain | tokenizer | finetune | loader | all (not maxbatch) | maxbatch | attention
    official: str = ''          # path of the official beit2/ folder: time it beside ours
    peak_tflops: float = 0.0    # device peak for MFU; 0 = known GPUs' dense bf16 peak, else no MFU
    threads: int = 0            # torch.set_num_threads; 0 = torch's default
    seed: int = 0
    workers: int = 4            # loader benchmark
    max_batch: int = 4096       # maxbatch: double the batch from batch_size up to this
    profile: bool = False       # pretrain: a kernel table of 3 of our student steps after the timing
    attention: str = 'auto'     # ours: auto (beitv2's choice) | explicit | sdpa | efficient (SDPA's kernel only)


PRESETS = {'cpu': {}}
PEAKS = {'H100': 989.0, 'H200': 989.0, 'A100': 312.0, 'L40S': 362.0, 'A10': 125.0}  # dense bf16 TFLOP/s


def vit_flops(n_tokens, D, depth, mlp_ratio=4.0):
    """Forward matmul FLOPs of `depth` blocks over n_tokens tokens of width D."""
    per_token = 2 * (4 * D * D + 2 * mlp_ratio * D * D) + 2 * 2 * n_tokens * D  # qkv+proj, mlp, attention
    return depth * n_tokens * per_token


def pretrain_flops(cfg, n_mask, batch):
    n = (cfg.img_size // cfg.patch_size) ** 2
    D = cfg.embed_dim
    fwd = vit_flops(n + 1, D, cfg.depth + cfg.head_layers) + 2 * n * 3 * cfg.patch_size ** 2 * D
    fwd += 2 * 2 * n_mask * D * cfg.vocab_size  # lm_head on the masked patches of both branches
    return 3 * fwd * batch


def tokenizer_flops(t, batch, train):
    c = t.cfg
    n = (c.img_size // c.patch_size) ** 2
    enc = vit_flops(n + 1, c.embed_dim, c.depth) + 2 * n * (3 * c.patch_size ** 2 * c.embed_dim
                                                            + c.embed_dim ** 2 + c.embed_dim * c.code_dim)
    enc += 2 * n * c.code_dim * c.codebook_size  # codebook distances
    if not train:
        return enc * batch
    dec = vit_flops(n + 1, c.embed_dim, c.decoder_depth) + 2 * n * (c.code_dim * c.embed_dim + c.embed_dim ** 2
                                                                    + c.embed_dim * c.teacher_dim)
    return 3 * (enc + dec) * batch


def load_official(root):
    """Import the official modules without editing them: stub the two imports that cannot work
    offline on torch 2 (utils: torch._six; vqkd_teacher: downloads), as shared/harness does."""
    if not os.path.isfile(os.path.join(root, 'modeling_pretrain.py')):
        common.die(f'--official={root} does not contain modeling_pretrain.py')
    sys.modules.setdefault('utils', types.ModuleType('utils'))
    stub = types.ModuleType('vqkd_teacher')
    stub.clip, stub.get_dino_vit_base = types.SimpleNamespace(load=None), None
    sys.modules.setdefault('vqkd_teacher', stub)
    sys.path.insert(0, os.path.abspath(root))
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            return importlib.import_module('modeling_pretrain')
        except ImportError as e:
            common.die(f'official code needs timm and einops installed: {e}')


def official_model(mod, cfg):
    with contextlib.redirect_stdout(io.StringIO()):
        return mod.VisionTransformerForMaskedImageModelingCLS(
            img_size=cfg.img_size, patch_size=cfg.patch_size, vocab_size=cfg.vocab_size, embed_dim=cfg.embed_dim,
            depth=cfg.depth, num_heads=cfg.num_heads, qkv_bias=True, drop_path_rate=0.0,
            norm_layer=functools.partial(nn.LayerNorm, eps=1e-6), init_values=cfg.layer_scale,
            use_abs_pos_emb=False, use_rel_pos_bias=False, use_shared_rel_pos_bias=True,
            early_layers=cfg.early_layers, head_layers=cfg.head_layers, shared_lm_head=True)


def make_step(model, images, mask, targets, amp, scaler, encode=None, tok_images=None, official=False):
    """One training step as the official engine: forward, CE on both heads (summed), backward,
    clip at 3.0, AdamW (lr 1.5e-3, wd 0.05 by the official groups). Returns a closure -> loss."""
    groups = beitv2.param_groups(model, 0.05)
    opt = torch.optim.AdamW(groups, lr=1.5e-3, betas=(0.9, 0.999))
    model.train()

    def step():
        codes = targets
        if encode is not None:
            with torch.no_grad(), amp():
                codes = encode(tok_images)
        with amp():
            if official:
                out = model(images, bool_masked_pos=mask)
                labels = codes[mask]
                loss = F.cross_entropy(out[0].float(), labels) + F.cross_entropy(out[1].float(), labels)
            else:
                loss = model(images, mask, codes)[1]['loss']
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        scaler.step(opt)
        scaler.update()
        return loss.item()
    return step


def timed(fns, cfg, device):
    """Alternate the step functions; -> name -> (list of ms, first loss, peak memory MiB)."""
    out = {name: ([], None, 0.0) for name in fns}
    for i in range(cfg.warmup + cfg.steps):
        for name, fn in fns.items():
            if device.type == 'cuda':
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            loss = fn()
            if device.type == 'cuda':
                torch.cuda.synchronize()
            ms, first, mem = out[name]
            mem = max(mem, torch.cuda.max_memory_allocated() / 2 ** 20) if device.type == 'cuda' else mem
            if i >= cfg.warmup:
                ms.append((time.perf_counter() - t0) * 1000)
            out[name] = (ms, loss if first is None else first, mem)
    return out


def use_attention(kind):
    """Route beitv2's attention through one of its paths (or SDPA's memory-efficient kernel only)."""
    plain = beitv2.attention
    if kind == 'explicit' or kind == 'sdpa':
        beitv2.attention = functools.partial(plain, explicit=kind == 'explicit')
    elif kind == 'efficient':
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def efficient(q, k, v, bias=None):
            with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
                return plain(q, k, v, bias, explicit=False)
        beitv2.attention = efficient
    elif kind != 'auto':
        common.die(f'--attention must be auto, explicit, sdpa or efficient, got {kind!r}')


def attention_backends(cfg, device, n_tokens, dtype):
    """Time one attention forward + backward (bias trainable, as the shared relative position
    table) through each way there is, and say why a kernel refuses."""
    import warnings
    from torch.nn.attention import SDPBackend, sdpa_kernel
    arch = beitv2.PRESETS[cfg.model]
    heads, hs = arch.num_heads, arch.embed_dim // arch.num_heads
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(cfg.batch_size, heads, n_tokens, hs, device=device, dtype=dtype, generator=g)
               .requires_grad_() for _ in range(3))
    table = torch.randn(heads, n_tokens, n_tokens, device=device, generator=g).requires_grad_()
    ways = {
        'explicit': lambda b: beitv2.attention(q, k, v, b, explicit=True),
        'sdpa (auto)': lambda b: beitv2.attention(q, k, v, b, explicit=False),
        'sdpa bias expanded (B, nh, N, N)': lambda b: beitv2.attention(
            q, k, v, b.expand(q.shape[0], -1, -1, -1).contiguous(), explicit=False),
        'sdpa bias without grad': lambda b: beitv2.attention(q, k, v, b.detach(), explicit=False),
        'sdpa no bias': lambda b: beitv2.attention(q, k, v, None, explicit=False)}
    for name, backend in (('efficient', SDPBackend.EFFICIENT_ATTENTION), ('cudnn', SDPBackend.CUDNN_ATTENTION),
                          ('flash', SDPBackend.FLASH_ATTENTION), ('math', SDPBackend.MATH)):
        def only(b, backend=backend):
            with sdpa_kernel(backend):
                return beitv2.attention(q, k, v, b, explicit=False)
        ways[f'sdpa {name} only'] = only
    for name, fn in ways.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            try:
                def step():
                    with torch.autocast(device.type, dtype=dtype):
                        fn(table).float().square().mean().backward()
                for _ in range(3):
                    step()
                if device.type == 'cuda':
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(10):
                    step()
                if device.type == 'cuda':
                    torch.cuda.synchronize()
                line = f'{(time.perf_counter() - t0) * 100:8.2f} ms fwd+bwd'
            except RuntimeError as e:
                line = 'refused: ' + str(e).strip().splitlines()[0][:150]
        why = list(dict.fromkeys(str(w.message).replace('\n', ' ')[:200] for w in caught))
        print(f'  attention {name:36s} {line}', flush=True)
        for w in why[:6]:
            print(f'      {w}', flush=True)


def largest_batch(make, cfg, device):
    """Double the batch from cfg.batch_size while one step (fresh model) fits; -> largest that did."""
    best, b = 0, cfg.batch_size
    while b <= cfg.max_batch:
        try:
            make(b)()  # step() ends with loss.item(): the step has run
        except torch.OutOfMemoryError:
            break
        finally:
            if device.type == 'cuda':
                torch.cuda.empty_cache()
        best, b = b, 2 * b
    return best


def profile(step, device, rows=15):
    """Print where the time of 3 steps goes, kernel by kernel (self time, slowest first)."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == 'cuda':
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(3):
            step()
    key = 'self_device_time_total' if device.type == 'cuda' else 'self_cpu_time_total'
    print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60), flush=True)


def report(name, ms, flops, batch, peak, mem):
    med = statistics.median(ms)
    line = f'{name:28s} {med:9.1f} ms/step  {batch / med * 1000:8.1f} img/s  {flops / med / 1e9:8.2f} TFLOP/s'
    if peak:
        line += f'  MFU {flops / med / 1e9 / peak:6.1%}'
    if mem:
        line += f'  peak {mem:.0f} MiB'
    print(line + f'  (min {min(ms):.1f}, max {max(ms):.1f}, n={len(ms)})', flush=True)
    return med


def main(argv=None):
    cfg = common.configure(Config(), PRESETS, argv)
    if not isinstance(beitv2.PRESETS[cfg.model], beitv2.BEiTConfig):
        common.die(f'--model={cfg.model} is a tokenizer; bench.py times the pretraining model (a beitv2_*)')
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device('cuda' if torch.cuda.is_available() and cfg.device != 'cpu' else 'cpu')
    amp_dtype = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}[cfg.dtype]
    ours_amp = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    name = torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'
    peak = cfg.peak_tflops or next((v for k, v in PEAKS.items() if k in name), 0.0)
    print(f'torch {torch.__version__}, {name}, {torch.get_num_threads()} threads, ours {cfg.dtype}'
          f'{" + compile" if cfg.compile else ""}, attention {cfg.attention}, batch {cfg.batch_size}, '
          f'peak {peak or "unknown"} TFLOP/s')

    use_attention(cfg.attention)
    torch.manual_seed(cfg.seed)
    mcfg = dataclasses.replace(beitv2.PRESETS[cfg.model], img_size=cfg.img_size)
    tcfg = beitv2.VQKDConfig(img_size=cfg.img_size, patch_size=16, decoder_depth=1, embed_dim=mcfg.embed_dim,
                             depth=min(mcfg.depth, 12), num_heads=mcfg.num_heads)
    grid = (cfg.img_size // 16,) * 2
    g = torch.Generator().manual_seed(cfg.seed)
    images = torch.randn(cfg.batch_size, 3, cfg.img_size, cfg.img_size, generator=g).to(device)
    tok_images = torch.rand(cfg.batch_size, 3, cfg.img_size, cfg.img_size, generator=g).to(device)
    masker = beitv2.MaskingGenerator(grid)
    mask = torch.stack([masker() for _ in range(cfg.batch_size)]).to(device)
    targets = torch.randint(0, mcfg.vocab_size, (cfg.batch_size, grid[0] * grid[1]), generator=g).to(device)
    n_mask = masker.num

    if cfg.what == 'attention':
        attention_backends(cfg, device, grid[0] * grid[1] + 1, amp_dtype or torch.float32)

    if cfg.what in ('pretrain', 'all'):
        model = beitv2.BEiTv2(mcfg).to(device)
        tok = beitv2.VQKD(tcfg).to(device).eval()
        tok.quantize.initted.fill_(1)
        encode = torch.compile(tok.encode) if cfg.compile else tok.encode
        run = torch.compile(model) if cfg.compile else model
        fns = {'ours: student step': make_step(run, images, mask, targets, ours_amp,
                                               torch.amp.GradScaler(device.type, enabled=cfg.dtype == 'fp16'))}
        if cfg.official:
            mod = load_official(cfg.official)
            off = official_model(mod, mcfg).to(device)
            off.load_state_dict(beitv2.export_state(model))  # same starting weights as ours
            off_amp = (lambda: torch.autocast('cuda', dtype=torch.float16)) if device.type == 'cuda' \
                else contextlib.nullcontext
            fns['official: student step'] = make_step(off, images, mask, targets, off_amp,
                                                      torch.amp.GradScaler(device.type, enabled=device.type == 'cuda'),
                                                      official=True)
        res = timed(fns, cfg, device)
        if cfg.profile:
            profile(fns['ours: student step'], device)
        flops = pretrain_flops(mcfg, n_mask, cfg.batch_size)
        meds = {k: report(k, ms, flops, cfg.batch_size, peak, mem) for k, (ms, _, mem) in res.items()}
        if cfg.official:
            print(f'first losses: ours {res["ours: student step"][1]:.6f}, '
                  f'official {res["official: student step"][1]:.6f}')
            print(f'ours/official median step time: {meds["ours: student step"] / meds["official: student step"]:.3f}')
            del off, fns
        scaler = torch.amp.GradScaler(device.type, enabled=cfg.dtype == 'fp16')
        step = make_step(run, images, mask, None, ours_amp, scaler, encode, tok_images)
        full = timed({'ours: full pretrain step': step}, cfg, device)
        tflops = tokenizer_flops(tok, cfg.batch_size, train=False)
        ms, _, mem = full['ours: full pretrain step']
        report('ours: full pretrain step', ms, flops + tflops, cfg.batch_size, peak, mem)
        print(f'  of which tokenizer encode: {tflops / (flops + tflops):.1%} of the FLOPs')
        del model, tok, run

    if cfg.what in ('tokenizer', 'all'):
        # the stage-1 step: a ViT-B/16-sized teacher stand-in (CLIP ViT-B/16's size) in no_grad,
        # then encoder, codebook (EMA update), decoder, cosine loss; tokenizer as the official one
        D = mcfg.embed_dim
        teacher = beitv2.ViT(beitv2.ViTConfig(img_size=cfg.img_size, patch_size=16, embed_dim=D, depth=12,
                                              num_heads=mcfg.num_heads)).to(device).eval()
        tok = beitv2.VQKD(beitv2.VQKDConfig(**{**tcfg.__dict__, 'teacher_dim': D})).to(device)
        tok.quantize.initted.fill_(1)
        opt = torch.optim.AdamW(beitv2.param_groups(tok, 1e-4), lr=2e-4, betas=(0.9, 0.99))
        run = torch.compile(tok) if cfg.compile else tok
        run_teacher = torch.compile(teacher.forward_patch_tokens) if cfg.compile else teacher.forward_patch_tokens

        def tok_step():
            with ours_amp():
                with torch.no_grad():
                    target = run_teacher(images)
                loss = run(tok_images, target)[2]['loss']
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.item()
        ms, _, mem = timed({'ours: tokenizer step': tok_step}, cfg, device)['ours: tokenizer step']
        flops = tokenizer_flops(tok, cfg.batch_size, True) + vit_flops(grid[0] * grid[1] + 1, D, 12) * cfg.batch_size
        report('ours: tokenizer train step', ms, flops, cfg.batch_size, peak, mem)
        del tok, teacher, run, run_teacher, opt

    if cfg.what in ('finetune', 'all'):
        # the stage-3 step: classifier (per-block relative position tables, mean pooling), drop path
        # 0.1, layer decay 0.65, label-free CE on 1000 classes; mixup/augmentation are data-side
        vit = beitv2.ViT(beitv2.classifier_config(mcfg, 1000, drop_path=0.1)).to(device)
        opt = torch.optim.AdamW(beitv2.param_groups(vit, 0.05, layer_decay=0.65), lr=5e-4, betas=(0.9, 0.999))
        run = torch.compile(vit) if cfg.compile else vit
        labels = torch.randint(0, 1000, (cfg.batch_size,), generator=g).to(device)
        vit.train()

        def ft_step():
            with ours_amp():
                loss = F.cross_entropy(run(images).float(), labels, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.item()
        ms, _, mem = timed({'ours: fine-tuning step': ft_step}, cfg, device)['ours: fine-tuning step']
        flops = 3 * (vit_flops(grid[0] * grid[1] + 1, mcfg.embed_dim, mcfg.depth)
                     + 2 * grid[0] * grid[1] * 3 * 16 ** 2 * mcfg.embed_dim) * cfg.batch_size
        report('ours: fine-tuning step', ms, flops, cfg.batch_size, peak, mem)
        del vit, run, opt

    if cfg.what == 'maxbatch':
        # the largest batch one pretraining step fits in, each side from scratch (eager unless --compile)
        def inputs(b):
            gb = torch.Generator().manual_seed(cfg.seed)
            x = torch.randn(b, 3, cfg.img_size, cfg.img_size, generator=gb).to(device)
            m = torch.stack([masker() for _ in range(b)]).to(device)
            return x, m, torch.randint(0, mcfg.vocab_size, (b, grid[0] * grid[1]), generator=gb).to(device)

        def ours(b):
            m = beitv2.BEiTv2(mcfg).to(device)
            return make_step(torch.compile(m) if cfg.compile else m, *inputs(b), ours_amp,
                             torch.amp.GradScaler(device.type, enabled=cfg.dtype == 'fp16'))
        print(f'largest batch, ours ({cfg.dtype}): {largest_batch(ours, cfg, device)}', flush=True)
        if cfg.official:
            mod = load_official(cfg.official)
            off_amp = (lambda: torch.autocast('cuda', dtype=torch.float16)) if device.type == 'cuda' \
                else contextlib.nullcontext

            def official(b):
                return make_step(official_model(mod, mcfg).to(device), *inputs(b), off_amp,
                                 torch.amp.GradScaler(device.type, enabled=device.type == 'cuda'), official=True)
            print(f'largest batch, official (fp16 autocast on CUDA): {largest_batch(official, cfg, device)}',
                  flush=True)

    if cfg.what in ('loader', 'all'):
        import pretrain
        pcfg = pretrain.Config(img_size=cfg.img_size, patch_size=16, batch_size=cfg.batch_size,
                               workers=cfg.workers, seed=cfg.seed)
        env = types.SimpleNamespace(world=1, rank=0, device=device)
        ds = common.DemoTextures('train', size=cfg.img_size)
        views = pretrain.TwoViews(cfg.img_size, cfg.img_size, 0.2, beitv2.MaskingGenerator(grid))
        loader, sampler = common.make_loader(ds, views, pcfg, env)
        it = common.stream(loader, sampler, 0, len(loader), 1)
        next(it)  # workers started
        t0, n = time.perf_counter(), 0
        for _ in range(cfg.steps):
            n += next(it)[1].shape[0]
        rate = n / (time.perf_counter() - t0)
        print(f'{"loader (demo data, 2 views)":28s} {rate:8.1f} img/s with {cfg.workers} workers')

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f'peak RSS of the process: {rss:.0f} MiB')


if __name__ == '__main__':
    main()
