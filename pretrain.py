"""Stage 2: BEiT v2 masked image modeling (paper Sec. 2.3): ~40% of the patches, in blocks, are
replaced by a mask token and the ViT predicts their codes from the frozen stage-1 tokenizer; a [CLS]
aggregation head predicts them again from [CLS] + the patch tokens after block early_layers (9 of 12
in ViT-B).

    python pretrain.py                         # demo: reads python train_tokenizer.py's output
    torchrun --nproc_per_node=8 pretrain.py --preset=base_1600 --data=/data/imagenet \
--tokenizer=vqkd_encoder_base_decoder_3x768x12_clip-d5036aa7.pth --accum=2

Settings are --key=value (`--help` lists them); README.md has the recipes.
"""
import os
from dataclasses import dataclass
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')  # before torch loads OpenMP: idle threads sleep

import torch

import beitv2
import data
import engine
import settings
from settings import above, at_least, die, half_open, input_file


@dataclass
class Config(settings.Run):
    # the student's input size; None: the --model's (32 for beitv2_demo), as every None below
    img_size: int = at_least(1, None)
    min_crop_scale: float = above(0, 0.2)  # RandomResizedCrop's smallest area (the recipe's 0.2)
    # ours or an official vqkd_*.pth file; its codebook size is the vocabulary
    tokenizer: str = input_file('out/tokenizer/ckpt.pt')
    # an architecture of beitv2.PRESETS: beitv2_base_patch16_224, beitv2_large_patch16_224, ...
    model: str = 'beitv2_demo'
    patch_size: int = at_least(1, None)  # pixels per patch side
    embed_dim: int = at_least(1, None)  # width
    depth: int = at_least(1, None)  # blocks
    num_heads: int = at_least(1, None)  # attention heads
    layer_scale: float = None  # layer scale's initial gain: 0.1 base, 1e-5 large
    # the [CLS] head reads the patch tokens after this block (9 in ViT-B)
    early_layers: int = at_least(1, None)
    head_layers: int = at_least(0, None)  # blocks of the [CLS] head (2; 0: BEiT v1's MIM alone)
    # stochastic depth rate of the last block (linear in depth)
    drop_path: float = half_open(0.0, 0, 1)
    # masked patches per image; unset: round(n x 75 / 196) of the n patches
    num_mask: int = at_least(0, None)
    # the smallest block of masked patches; unset: max(2, round(16 n / 196))
    min_mask_block: int = at_least(1, None)
    clip_grad: float = at_least(0, 3.0)  # gradient norm clipping; 0 = none
    out_dir: str = 'out/pretrain'  # where checkpoints and log.jsonl go


# the official PRETRAINING.md: 2048 images per step (16 GPUs x 128 base, 64 GPUs x 32 large)
BASE = dict(data='', tokenizer='', model='beitv2_base_patch16_224', batch_size=128,
            recipe_batch=2048, steps=None, warmup_steps=None, warmup_epochs=10, workers=10,
            log_every=100, ckpt_every=5000)
LARGE = dict(BASE, model='beitv2_large_patch16_224', batch_size=32)
PRESETS = {
    'demo': {},
    # Fashion-MNIST (docs/results.md), after train_tokenizer.py's fmnist
    'fmnist': dict(steps=1500, warmup_steps=100),
    'base_1600': dict(BASE, epochs=1600, betas=(0.9, 0.999), drop_path=0.1),
    'base_300': dict(BASE, epochs=300, betas=(0.9, 0.98), drop_path=0.0),
    'large_1600': dict(LARGE, epochs=1600, betas=(0.9, 0.999), drop_path=0.1),
    'large_300': dict(LARGE, epochs=300, betas=(0.9, 0.98), drop_path=0.0),
}


@settings.one_line_errors
def main(argv=None):
    cfg = settings.configure(Config(), PRESETS, argv)
    if not cfg.tokenizer or not os.path.exists(cfg.tokenizer):
        die(f'tokenizer {cfg.tokenizer!r} not found: run `python train_tokenizer.py` first (the '
            'demo), or pass --tokenizer=vqkd_encoder_base_decoder_3x768x12_clip-d5036aa7.pth')
    if cfg.img_size % cfg.patch_size:
        die(f'img_size {cfg.img_size} is not divisible by patch_size {cfg.patch_size}')
    env = engine.Env(cfg.device, cfg.dtype, cfg.seed, cfg.out_dir, cfg.compile)
    tokenizer = engine.read_tokenizer(cfg.tokenizer, env.device)
    grid = cfg.img_size // cfg.patch_size
    if tokenizer.grid != (grid, grid):
        die(f'tokenizer grid {tokenizer.grid} != student grid {(grid, grid)}: match '
            'img_size/patch_size')
    try:
        masker = beitv2.MaskingGenerator((grid, grid), cfg.num_mask, cfg.min_mask_block)
    except ValueError as e:
        die(f'--num_mask / --min_mask_block: {e} ({grid}x{grid} patches)')
    vocab = tokenizer.cfg.codebook_size
    env.print(f'masking {masker.num} of {grid * grid} patches per image (blocks >= '
              f'{masker.min_num}); vocabulary {vocab} codes')

    # one crop box, cut at the student's size and the tokenizer's; colour jitter 0.4 (official)
    views = data.Crops((cfg.img_size, tokenizer.cfg.img_size), cfg.min_crop_scale, 0.4, masker)
    loader = data.make_loader(data.build_dataset(cfg.data, 'train', cfg.img_size, labels=False),
                              views, cfg, env)
    model = beitv2.BEiTv2(settings.model_config(cfg, vocab_size=vocab)).to(env.device)
    optimizer = engine.adamw(model, cfg, cfg.lr)  # fused: 1 kernel
    counts = torch.zeros(vocab, dtype=torch.long, device=env.device)  # the codes since the last log

    def train_step(model, batch):
        mask = batch['mask'].to(env.device, non_blocking=True)          # (B, n), True = masked
        images = data.to_device(batch['images'], env.device)           # (B, 3, S, S) in [0, 1]
        tokenizer_images = images  # the same view, unless the tokenizer has a size of its own
        if 'tokenizer_images' in batch:
            tokenizer_images = data.to_device(batch['tokenizer_images'], env.device)
        with torch.no_grad(), env.target_autocast():
            codes = tokenizer.encode(tokenizer_images)                  # (B, n): the targets
        counts.index_add_(0, codes.flatten(), torch.ones_like(codes.flatten()))
        images = data.normalize(images)  # ImageNet's mean and std, in place: the tokenizer read it
        logits, losses = model(images, mask, codes, num_masked=masker.num)  # static shapes
        labels = beitv2.masked_rows(codes, mask, masker.num)           # (M,) the masked patches'
        # the official log names: _1 the last layer's predictions, _2 the [CLS] head's
        stats = dict(loss_1=losses['loss_mim'].detach(),
                     mlm_acc_1=(logits['mim'].argmax(-1) == labels).float().mean())
        if 'cls' in logits:  # with head layers
            stats.update(loss_2=losses['loss_cls'].detach(),
                         mlm_acc_2=(logits['cls'].argmax(-1) == labels).float().mean())
        return losses['loss'], stats

    def at_log(step):  # the target codes used since the last log line, on all ranks
        used = beitv2.code_usage(env.all_reduce(counts))['codes_used']
        counts.zero_()
        return dict(codes_used=used)
    engine.plan(cfg, env, loader, optimizer)
    engine.fit(cfg, env, model, optimizer, loader, train_step, at_log=at_log)
    env.close()
    return model


if __name__ == '__main__':
    main()
