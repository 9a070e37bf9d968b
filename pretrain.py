"""Stage 2: BEiT v2 masked image modeling (paper Sec. 2.3): ~40% of the patches, in blocks,
are replaced by a mask token and the ViT predicts their codes from the frozen stage-1
tokenizer; a [CLS] aggregation head predicts them again from [CLS] + the patch tokens after block
early_layers (9 of 12 in ViT-B).

    python pretrain.py                                          # demo: uses python train_tokenizer.py's output
    torchrun --nproc_per_node=8 pretrain.py --preset=base_1600 --data=/data/imagenet \\
        --tokenizer=vqkd_encoder_base_decoder_3x768x12_clip-d5036aa7.pth --accum=2
Settings are --key=value (`--help` lists them); README.md has the recipes.
"""
import os
from dataclasses import asdict, dataclass
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')  # before torch loads OpenMP: idle threads sleep (a busy machine)

import torch

import beitv2
import common
import data


@dataclass
class Config(common.Run):
    img_size: int = common.at_least(1, None)  # None: the --model's (32 for beitv2_demo), as every None below
    min_crop_scale: float = common.above(0, 0.2)  # RandomResizedCrop scale range (paper recipe: 0.2)
    tokenizer: str = 'out/tokenizer/ckpt.pt'  # ours or an official vqkd_*.pth file
    # model: an architecture of beitv2.PRESETS; None = its value (vocab_size = the tokenizer's codebook size)
    model: str = 'beitv2_demo'      # beitv2_base_patch16_224, beitv2_large_patch16_224, ...
    patch_size: int = common.at_least(1, None)
    embed_dim: int = common.at_least(1, None)
    depth: int = common.at_least(1, None)
    num_heads: int = common.at_least(1, None)
    layer_scale: float = None       # 0.1 base, 1e-5 large
    early_layers: int = common.at_least(1, None)  # [CLS] head reads patch tokens after this block (9 base)
    head_layers: int = common.at_least(0, None)  # blocks of the [CLS] head (2; 0: BEiT v1's MIM only)
    drop_path: float = common.within(0.0, 0, 1, ')')  # stochastic depth rate of the last block (linear in depth)
    num_mask: int = common.at_least(-1, -1)  # masked of the n patches per image; -1 = round(n * 75 / 196)
    min_mask_block: int = common.at_least(-1, -1)  # smallest mask block; -1 = max(2, round(16 n / 196))
    clip_grad: float = common.at_least(0, 3.0)
    out_dir: str = 'out/pretrain'   # where checkpoints and log.jsonl go


BASE = dict(data='', tokenizer='', model='beitv2_base_patch16_224', batch_size=128, recipe_batch=2048,
            warmup_epochs=10, workers=10, log_every=100, ckpt_every=5000)
LARGE = dict(BASE, model='beitv2_large_patch16_224', batch_size=32)
PRESETS = {  # official PRETRAINING.md: 2048 images per step (16 GPUs x 128 base, 64 x 32 large)
    'demo': {},
    'fmnist': dict(steps=1500, warmup_steps=100),  # Fashion-MNIST (docs/results.md), after train_tokenizer's fmnist
    'base_1600': dict(BASE, epochs=1600, betas=(0.9, 0.999), drop_path=0.1),
    'base_300': dict(BASE, epochs=300, betas=(0.9, 0.98), drop_path=0.0),
    'large_1600': dict(LARGE, epochs=1600, betas=(0.9, 0.999), drop_path=0.1),
    'large_300': dict(LARGE, epochs=300, betas=(0.9, 0.98), drop_path=0.0),
}


def main(argv=None):
    cfg = common.configure(Config(), PRESETS, argv)
    if not cfg.tokenizer or not os.path.exists(cfg.tokenizer):
        common.die(f'tokenizer {cfg.tokenizer!r} not found: run `python train_tokenizer.py` first (demo), '
                   'or pass --tokenizer=vqkd_encoder_base_decoder_3x768x12_clip-d5036aa7.pth')
    if cfg.img_size % cfg.patch_size:
        common.die(f'img_size {cfg.img_size} is not divisible by patch_size {cfg.patch_size}')
    env = common.Env(cfg)
    tokenizer = common.read_tokenizer(cfg.tokenizer, env.device)
    grid = cfg.img_size // cfg.patch_size
    if tokenizer.grid != (grid, grid):
        common.die(f'tokenizer grid {tokenizer.grid} != student grid {(grid, grid)}: match img_size/patch_size')
    try:
        masker = beitv2.MaskingGenerator((grid, grid), None if cfg.num_mask < 0 else cfg.num_mask,
                                         None if cfg.min_mask_block < 0 else cfg.min_mask_block)
    except ValueError as e:
        common.die(f'--num_mask / --min_mask_block: {e} ({grid}x{grid} patches)')
    dataset = data.build_dataset(cfg.data, 'train', cfg.img_size)
    views = data.Crops((cfg.img_size, tokenizer.cfg.img_size), cfg.min_crop_scale, 0.4, masker)  # official jitter 0.4
    env.print(f'masking {masker.num} of {grid * grid} patches per image (blocks >= {masker.min_num}); '
              f'vocabulary {tokenizer.cfg.codebook_size} codes')

    mcfg = common.model_config(cfg, vocab_size=tokenizer.cfg.codebook_size)
    model = beitv2.BEiTv2(mcfg).to(env.device)
    optimizer = torch.optim.AdamW(common.param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas,
                                  fused=True)  # fused: one kernel for all parameters
    counts = torch.zeros(tokenizer.cfg.codebook_size, dtype=torch.long, device=env.device)  # codes since the last log

    def step(run, batch):
        (*crops, mask), _ = batch  # one crop when the tokenizer's size is the student's
        x, mask = data.to_device(crops[-1], env.device), mask.to(env.device, non_blocking=True)  # in [0, 1]
        with torch.no_grad(), env.target_autocast():
            codes = tokenizer.encode(x)  # (B, n) targets
        images = data.normalize(x if len(crops) == 1 else data.to_device(crops[0], env.device))  # in place: x is done
        logits, losses = run(images, mask, codes, num_masked=masker.num)  # static shapes
        counts.index_add_(0, codes.flatten(), torch.ones_like(codes.flatten()))
        labels, stats = beitv2.masked_rows(codes, mask, masker.num), {}
        for i, (name, lg) in enumerate(logits.items(), 1):  # official log names: _1 the main branch, _2 the [CLS] head
            stats[f'loss_{i}'] = losses[f'loss_{name}'].detach()
            stats[f'mlm_acc_{i}'] = (lg.argmax(-1) == labels).float().mean()
        return losses['loss'], stats

    def at_log():  # the target codes used since the last log line, on all ranks
        unused = common.code_usage(env.all_reduce(counts))['unused']
        counts.zero_()
        return dict(unused_codes=unused)
    common.fit(cfg, env, model, optimizer, dataset, views, step, inputs=('tokenizer',), model_config=asdict(mcfg),
               sync_buffers=False, at_log=at_log)  # buffers are derived: no broadcasts
    env.close()
    return model


if __name__ == '__main__':
    main()
