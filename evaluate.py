"""Stage 3: evaluate a pretrained backbone (ours or an official file) by linear probing, k-NN,
fine-tuning or semantic segmentation, and look inside a backbone or a tokenizer. The modes, in the
order this file holds them:

    python evaluate.py --mode=linear | knn          # one probe on the --backbone
    python evaluate.py                              # compare (demo): both probes, pretrained vs random init vs pixels
    python evaluate.py --mode=finetune | segment
    python evaluate.py --mode=attention --image=PATH --query=3,4   # a patch's attention, per head
    python evaluate.py --mode=codebook --checkpoint=out/tokenizer/ckpt.pt
    python evaluate.py --mode=codes --checkpoint=out/tokenizer/ckpt.pt --image=PATH
    torchrun --nproc_per_node=8 evaluate.py --preset=finetune_base --data=/data/imagenet \\
        --checkpoint=beitv2_base_patch16_224_pt1k.pth
Settings are --key=value (see Config, grouped by mode); README.md has the recipes.
"""
import contextlib
import json
import math
import os
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
import torchvision.transforms.v2 as T2
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP

import beitv2
import common


@dataclass
class Config:
    preset: str = 'demo'
    mode: str = 'compare'           # linear | knn | compare (both probes, 3 backbones) | finetune | segment |
    #                                 attention | codebook | codes
    checkpoint: str = 'out/pretrain/ckpt.pt'  # ours or official (pretraining / fine-tuned / tokenizer)
    data: str = 'demo'              # 'demo', ImageNet-layout folder, cifar10:ROOT, ...;
    #                                 segment: demo, ade20k:ROOT or voc:ROOT
    img_size: int = common.at_least(1, 32)
    min_crop_scale: float = common.above(0, 0.5)  # RandomResizedCrop scale range for linear / fine-tune training
    workers: int = common.at_least(0, 2)
    # which backbone (linear, knn, finetune, segment)
    backbone: str = 'checkpoint'    # checkpoint | random: its architecture at the official init
    #                                 (what pretraining started from) | pixels: raw pixels, no network
    # linear / knn / compare features
    feature: str = 'cls'            # cls: [CLS] after the final norm (paper); mean: mean patch token
    layer: int = -1                 # block whose tokens are used; -1 = last
    linear_recipe: str = 'mae'      # mae: BatchNorm + linear, LARS, no wd | beit: AdamW, a head per block
    knn_k: int = common.at_least(1, 20)
    knn_t: float = 0.07
    backbones: tuple = ('checkpoint', 'random', 'pixels')  # compare: the backbones set side by side
    seeds: int = common.at_least(1, 1)   # compare: probes with seeds seed, seed+1, ... (mean reported)
    # fine-tuning
    layer_decay: float = 0.65
    drop_path: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    smoothing: float = 0.1
    reprob: float = 0.25            # random erasing probability
    randaug: bool = True            # timm's RandAugment rand-m9-mstd0.5-inc1 (official --aa)
    eval_only: bool = False         # score --checkpoint on the val split, no training
    robust_test: str = ''           # finetune --eval_only: imagenet_a | imagenet_r; --data = that set's folder
    eval_every: int = common.at_least(-1, -1)  # training modes: score val every N steps too (log: val_*;
    #                                 result: final and best_*); -1 = each epoch of --epochs recipes, else 0: the end
    # segmentation
    seg_layers: tuple = (1, 2, 3, 5)  # blocks feeding the 4 scales (official base: 3, 5, 7, 11)
    seg_stride: int = 0             # sliding-window stride at test time; 0 = 2/3 of img_size
    # attention / codes pictures
    image: str = ''                 # image file; '' = the first val image of --data
    query: str = 'cls'              # attention of: cls, or a patch ROW,COL (0-based)
    # optimisation
    batch_size: int = common.at_least(1, 64)
    accum: int = common.at_least(1, 1)
    epochs: int = common.at_least(0, 0)
    warmup_epochs: int = common.at_least(0, 0)
    steps: int = common.at_least(1, 300)
    warmup_steps: int = common.at_least(0, 30)
    lr: float = common.above(0, 4.0)     # demo LARS: 300 steps need more than MAE's 0.1 x batch / 256
    schedule: str = 'cosine'        # cosine (per step) | poly (linear decay: the official segmentation one) |
    #                                 cosine_epoch (per epoch, no warmup: BEiT v1 linear; needs --epochs)
    min_lr: float = common.at_least(0, 0.0)
    weight_decay: float = common.at_least(0, 0.0)
    betas: tuple = (0.9, 0.999)
    clip_grad: float = common.at_least(0, 0.0)
    # run
    device: str = ''
    dtype: str = ''                 # as pretrain.py
    compile: bool = False
    seed: int = 0
    out_dir: str = 'out/eval'
    resume: str = ''
    allow_change: str = ''          # resume: settings that may differ from the checkpoint's, e.g. steps
    log_every: int = common.at_least(1, 50)
    ckpt_every: int = common.at_least(1, 1000)
    stop_after: int = common.at_least(0, 0)


IN1K = dict(data='', checkpoint='', img_size=224, min_crop_scale=0.08, workers=10, log_every=100, ckpt_every=5000)
FT = dict(IN1K, mode='finetune', min_lr=1e-6, weight_decay=0.05)
SEG = dict(IN1K, mode='segment', img_size=512, batch_size=2, steps=160000, warmup_steps=1500, weight_decay=0.05,
           seg_stride=341, schedule='poly')
PRESETS = {
    'demo': {},
    'demo_finetune': dict(mode='finetune', lr=1e-3, weight_decay=0.05, steps=300, warmup_steps=30),
    'demo_segment': dict(mode='segment', lr=1e-3, weight_decay=0.05, layer_decay=0.9, steps=300, schedule='poly'),
    # MAE linear protocol: batch 16384 with LARS, lr 0.1 x batch / 256, 90 epochs, 10 warmup
    'linear_base': dict(IN1K, mode='linear', batch_size=1024, accum=2, epochs=90, warmup_epochs=10, lr=6.4),
    'linear_beit': dict(IN1K, mode='linear', linear_recipe='beit', batch_size=128, epochs=100, lr=4e-3,
                        weight_decay=1e-4, schedule='cosine_epoch'),  # official BEiT v1 run_linear_eval.py
    'knn_base': dict(IN1K, mode='knn', batch_size=256),
    # fine-tuning, official get_started_for_image_classification.md (8 GPUs; batch = GPUs x batch x accum)
    # base from the pretrained model: 8 x 128, lr 5e-4, 100 epochs, layer decay 0.6 (1600 ep) / 0.65 (300 ep)
    'finetune_base': dict(FT, batch_size=128, epochs=100, warmup_epochs=20, lr=5e-4, layer_decay=0.6,
                          drop_path=0.2),
    'finetune_base_300': dict(FT, batch_size=128, epochs=100, warmup_epochs=20, lr=5e-4, layer_decay=0.65,
                              drop_path=0.1),
    # large from the pretrained model: 8 x 64 x update_freq 2, lr 2e-4 (1600 ep) / 5e-4 (300 ep), 50 epochs,
    # 5 warmup, layer decay 0.8, drop path 0.2
    'finetune_large': dict(FT, batch_size=64, accum=2, epochs=50, warmup_epochs=5, lr=2e-4, layer_decay=0.8,
                           drop_path=0.2),
    'finetune_large_300': dict(FT, batch_size=64, accum=2, epochs=50, warmup_epochs=5, lr=5e-4, layer_decay=0.8,
                               drop_path=0.2),
    # intermediate fine-tuning on ImageNet-21k (21841 classes): 32 GPUs x 128 = 4096 (8 GPUs: accum 4), lr 6e-4,
    # 90 epochs, 20 warmup, layer decay 0.75, drop path 0.1 base / 0.2 large, no evaluation during training
    'finetune_21k_base': dict(FT, batch_size=128, accum=4, epochs=90, warmup_epochs=20, lr=6e-4, layer_decay=0.75,
                              drop_path=0.1, eval_every=0),
    'finetune_21k_large': dict(FT, batch_size=128, accum=4, epochs=90, warmup_epochs=20, lr=6e-4, layer_decay=0.75,
                               drop_path=0.2, eval_every=0),
    # then ImageNet-1k from the 21k model, no mixup/cutmix: base 8 x 128, lr 5e-5, 30 epochs, 20 warmup,
    # layer decay 0.75, drop path 0.1; large 8 x 64 x 2, lr 7e-5, 20 epochs, 5 warmup, 0.8, drop path 0.25
    'finetune_21kto1k_base': dict(FT, batch_size=128, epochs=30, warmup_epochs=20, lr=5e-5, layer_decay=0.75,
                                  drop_path=0.1, mixup=0.0, cutmix=0.0),
    'finetune_21kto1k_large': dict(FT, batch_size=64, accum=2, epochs=20, warmup_epochs=5, lr=7e-5, layer_decay=0.8,
                                   drop_path=0.25, mixup=0.0, cutmix=0.0),
    # segmentation, official semantic_segmentation/configs/beit/upernet/upernet_beit_*_512_slide_160k_*.py:
    # UperNet on ADE20K, 8 GPUs x 2 images of 512, 160k iterations, poly schedule, 1500 warmup, slide 341
    'segment_base': dict(SEG, seg_layers=(3, 5, 7, 11), lr=5e-5, layer_decay=0.75, drop_path=0.15),
    'segment_base_21ktoade20k': dict(SEG, seg_layers=(3, 5, 7, 11), lr=5e-5, layer_decay=0.85, drop_path=0.15),
    'segment_large': dict(SEG, seg_layers=(7, 11, 15, 23), lr=4e-5, layer_decay=0.9, drop_path=0.2),
    'segment_large_21ktoade20k': dict(SEG, seg_layers=(7, 11, 15, 23), lr=3e-5, layer_decay=0.9, drop_path=0.2),
}

# -------------------------------------------------------------- backbones: a checkpoint, its random init, or raw pixels


def vit_config_from_state(sd, **over):
    """ViTConfig for an official / timm / our state dict, read off its shapes (64-dim heads)."""
    w = sd['patch_embed.proj.weight']
    D, p = w.shape[0], w.shape[-1]
    depth = len({k.split('.')[1] for k in sd if k.startswith('blocks.')})
    table = sd.get('rel_pos_bias.relative_position_bias_table', sd.get('blocks.0.attn.relative_position_bias_table'))
    grid = (int(math.sqrt(table.shape[0] - 3)) + 1) // 2 if table is not None else None
    cfg = dict(img_size=grid * p if grid else 224, patch_size=p, embed_dim=D, depth=depth, num_heads=D // 64,
               layer_scale=0.1 if 'blocks.0.gamma_1' in sd else 0.0, abs_pos_emb='pos_embed' in sd,
               rel_pos='shared' if 'rel_pos_bias.relative_position_bias_table' in sd else
               'per_block' if table is not None else 'none', fc_norm='norm.weight' not in sd,
               num_classes=sd['head.weight'].shape[0] if 'head.weight' in sd else 0)
    cfg.update(over)
    return beitv2.ViTConfig(**cfg)


def load_weights(path):
    """-> (state dict, our ViT/BEiT config or None) of a checkpoint; tokenizers are refused."""
    if not os.path.exists(path):
        common.die(f'checkpoint {path!r} not found')
    try:
        ckpt = beitv2.load_file(path)
        sd = beitv2.state_dict_of(ckpt)
    except ValueError as e:
        common.die(str(e))
    if any(k.startswith(('encoder.', 'quantize.')) for k in sd):
        common.die(f'{path} is a tokenizer; this mode needs a pretraining or fine-tuned backbone')
    if 'patch_embed.proj.weight' not in sd:
        common.die(f'{path}: no ViT weights in it')
    mcfg = ckpt.get('model_config')  # ours only
    return sd, beitv2.current_names(mcfg) if isinstance(mcfg, dict) else None


def load_backbone_weights(cfg):
    if cfg.backbone not in ('checkpoint', 'random', 'pixels'):
        common.die(f'--backbone must be checkpoint, random or pixels, got {cfg.backbone!r}')
    sd, mcfg = load_weights(cfg.checkpoint)
    if cfg.backbone == 'random':  # what pretraining started from: the official init of the same model
        if not mcfg or 'vocab_size' not in mcfg:
            common.die('--backbone=random needs one of our pretraining checkpoints (it reads the architecture)')
        torch.manual_seed(cfg.seed)
        sd = beitv2.BEiTv2(beitv2.BEiTConfig(**mcfg)).state_dict()
    return sd, mcfg


class Pixels(nn.Module):
    """The raw-pixel baseline: the (normalised) image itself as the feature vector."""

    def __init__(self, img_size):
        super().__init__()
        self.dim = 3 * img_size * img_size

    def forward(self, images):
        return images.flatten(1)


def build_backbone(cfg, sd, mcfg, **over):
    """The checkpoint's ViT as it was trained (final norm and shared bias for pretraining files),
    without its heads; `over` changes the config (e.g. a classifier layout)."""
    base = vit_config_from_state(sd)
    if mcfg:  # ours: the saved config (a BEiTConfig for pretraining checkpoints)
        base = beitv2.ViTConfig(**{k: v for k, v in mcfg.items() if k in beitv2.ViTConfig.__dataclass_fields__})
    vcfg = beitv2.ViTConfig(**{**asdict(base), 'img_size': cfg.img_size, **over})
    if cfg.img_size % vcfg.patch_size:
        common.die(f'--img_size={cfg.img_size} is not a multiple of the patch size {vcfg.patch_size} '
                   f'of {cfg.checkpoint}')
    drop = ('mask_token', 'lm_head', 'cls_pt_layers') + (('head',) if vcfg.num_classes == 0 else ())
    if vcfg.fc_norm:
        drop += ('norm',) + (('fc_norm',) if 'fc_norm.weight' not in sd else ())
    if vcfg.num_classes and sd.get('head.weight', torch.empty(0)).shape[:1] != (vcfg.num_classes,):
        drop += ('head', 'fc_norm')  # a fresh head (official: dropped when the class count differs)
    model = beitv2.ViT(vcfg)
    try:
        beitv2.load_state(model, sd, ignore=drop)
    except (KeyError, ValueError) as e:
        common.die(f'{cfg.checkpoint}: {e}')
    return model


def feature_backbone(cfg):
    """What linear probing and k-NN read features from: the checkpoint's ViT, the same ViT at its
    random init, or raw pixels (--backbone)."""
    if cfg.backbone == 'pixels':
        return Pixels(cfg.img_size)
    sd, mcfg = load_backbone_weights(cfg)
    return build_backbone(cfg, sd, mcfg, num_classes=0, drop_path=0.0)


def pooled(backbone, images, cfg):
    """[CLS] or mean patch token of block `cfg.layer` (after the final norm for the last block)."""
    if isinstance(backbone, Pixels):
        return backbone(images)
    layer = cfg.layer % backbone.cfg.depth
    x, taken = backbone.forward_tokens(images, layers=(layer,))
    x = taken[0]
    f = x[:, 0] if cfg.feature == 'cls' else x[:, 1:].mean(1)
    if layer == backbone.cfg.depth - 1:
        f = (backbone.norm or backbone.fc_norm)(f)
    return f

# ----------------------------------------------------------- shared by the modes: data, features, training loop, scores


def classification_data(cfg, split):
    ds = common.build_dataset(cfg.data, split, cfg.img_size)
    classes = len(getattr(ds, 'classes', None) or common.DemoTextures.classes)
    return ds, classes


class _Mapped(torch.utils.data.Dataset):  # dataset with a per-image transform (evaluation)
    def __init__(self, ds, t):
        self.ds, self.t = ds, t

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        img, y = self.ds[i]
        return self.t(common.rgb(img)), y


class RandAugment:
    """timm's rand-m9-mstd0.5-inc1, the official fine-tuning `--aa`, with torchvision's and PIL's ops:
    `layers` ops drawn with replacement from OPS; each applied with probability `prob`, at a magnitude
    drawn from N(magnitude, std) clipped to [0, 10] (timm's _LEVEL_DENOM) and mapped to its range,
    signed ops negated with probability 0.5; fill = the ImageNet mean colour, bicubic resampling
    (the official hyper-parameters). rng: a random.Random; the draws come in timm's order."""
    OPS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'PosterizeIncreasing', 'SolarizeIncreasing',
           'SolarizeAdd', 'ColorIncreasing', 'ContrastIncreasing', 'BrightnessIncreasing',
           'SharpnessIncreasing', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel')
    ENHANCE = {'Color': T.functional.adjust_saturation, 'Contrast': T.functional.adjust_contrast,
               'Brightness': T.functional.adjust_brightness, 'Sharpness': T.functional.adjust_sharpness}

    def __init__(self, magnitude=9.0, std=0.5, layers=2, prob=0.5):
        self.magnitude, self.std, self.layers, self.prob = magnitude, std, layers, prob
        self.fill = tuple(min(255, round(255 * m)) for m in common.IMAGENET_MEAN)  # (124, 116, 104)

    def __call__(self, img, rng):
        for name in rng.choices(self.OPS, k=self.layers):
            if rng.random() > self.prob:
                continue
            level = max(0.0, min(rng.gauss(self.magnitude, self.std), 10.0)) / 10  # in [0, 1]
            img = self.apply(img, name, level, rng)
        return img

    def apply(self, img, name, level, rng):
        """One op at `level` in [0, 1] (timm's magnitude / 10), on a PIL RGB image."""
        def signed(v):  # timm's _randomly_negate
            return -v if rng.random() > 0.5 else v
        TF = T.functional
        if name in ('AutoContrast', 'Equalize', 'Invert'):
            return {'AutoContrast': TF.autocontrast, 'Equalize': TF.equalize, 'Invert': TF.invert}[name](img)
        if name == 'Rotate':                                      # up to 30 degrees
            return TF.rotate(img, signed(level * 30), T.InterpolationMode.BICUBIC, fill=self.fill)
        if name == 'PosterizeIncreasing':                         # keep 4 down to 0 bits
            bits = 4 - int(level * 4)  # 0 (at magnitude 10) is black; newer PIL refuses posterize(0)
            return TF.posterize(img, bits) if bits else Image.new(img.mode, img.size)
        if name == 'SolarizeIncreasing':                          # invert above 256 down to 0
            return TF.solarize(img, 256 - min(256, int(level * 256)))
        if name == 'SolarizeAdd':                                 # add up to 110 below 128
            add = min(128, int(level * 110))
            return img.point([min(255, i + add) if i < 128 else i for i in range(256)] * 3)
        if name.endswith('Increasing'):                           # blend factor 1 -/+ up to 0.9
            return self.ENHANCE[name[:-len('Increasing')]](img, max(0.1, 1.0 + signed(level * 0.9)))
        if name in ('ShearX', 'ShearY'):                          # shear factor up to 0.3
            s = signed(level * 0.3)
            matrix = (1, s, 0, 0, 1, 0) if name == 'ShearX' else (1, 0, 0, s, 1, 0)
        else:                                                     # shift up to 45% of the side
            t = signed(level * 0.45)
            matrix = (1, 0, t * img.size[0], 0, 1, 0) if name == 'TranslateXRel' else (1, 0, 0, 0, 1, t * img.size[1])
        return img.transform(img.size, Image.AFFINE, matrix, Image.BICUBIC, fillcolor=self.fill)


class TrainTransform:
    """Linear probe: RandomResizedCrop + flip (MAE: bicubic; BEiT v1's linear recipe: bilinear).
    Fine-tuning adds RandAugment (timm's rand-m9-mstd0.5-inc1, as the official run) and random
    erasing (reprob 0.25, pixel mode)."""

    def __init__(self, cfg, finetune):
        bilinear = not finetune and cfg.linear_recipe == 'beit'
        mode = T.InterpolationMode.BILINEAR if bilinear else T.InterpolationMode.BICUBIC
        self.crop = T.Compose([T.RandomResizedCrop(cfg.img_size, scale=(cfg.min_crop_scale, 1.0), interpolation=mode),
                               T.RandomHorizontalFlip()])
        self.randaug = RandAugment() if finetune and cfg.randaug else None
        after = [T.ToTensor(), T.Normalize(common.IMAGENET_MEAN, common.IMAGENET_STD)]
        if finetune and cfg.reprob > 0:
            after.append(T.RandomErasing(cfg.reprob, value='random'))
        self.after = T.Compose(after)

    def __call__(self, img, rng):
        img = self.crop(img)
        if self.randaug is not None:
            img = self.randaug(img, rng)
        return self.after(img)


@torch.no_grad()
def extract(fn, dataset, cfg, env):
    """fn(images) -> (B, C) for every image of `dataset` (no augmentation), gathered on all ranks."""
    shard = torch.utils.data.Subset(dataset, range(env.rank, len(dataset), env.world))
    feats, labels = [], []
    for x, y in torch.utils.data.DataLoader(shard, cfg.batch_size, num_workers=cfg.workers):
        with env.autocast():
            feats.append(fn(x.to(env.device)).float())
        labels.append(y.to(env.device))
    f, y = torch.cat(feats), torch.cat(labels)
    if env.ddp:  # pad to equal length, gather, drop the padding, restore the dataset order
        n = math.ceil(len(dataset) / env.world)

        def pad(t):
            return torch.cat([t, t.new_zeros((n - len(t),) + t.shape[1:])])
        gf = [torch.empty_like(pad(f)) for _ in range(env.world)]
        gy = [torch.empty_like(pad(y)) for _ in range(env.world)]
        dist.all_gather(gf, pad(f))
        dist.all_gather(gy, pad(y))
        f = torch.stack(gf, 1).flatten(0, 1)[:len(dataset)]  # rank r held items r, r + world, ...
        y = torch.stack(gy, 1).flatten(0, 1)[:len(dataset)]
    return f, y


def fit(cfg, env, model, optimizer, loader, sampler, n_train, loss_fn, score, metric='top1', quiet=False):
    """The training loop of the three trained modes (the stage scripts' loop): per-step lr with
    warmup + cosine, scaled per group, accumulation, clipping, logging, atomic checkpoints, resume.
    loss_fn(model, batch) -> loss; score(model) -> dict of metrics, every --eval_every steps and at
    the end. -> the final scores, and the best `metric` of all those evaluations with its step
    (best_top1, best_step: what the official fine-tuning script reports as max accuracy)."""
    steps_per_epoch, per_step = common.steps_from_epochs(cfg, env, n_train)
    if not quiet:
        common.print_setup(cfg, env, steps_per_epoch, per_step)
    every = cfg.eval_every if cfg.eval_every >= 0 else (steps_per_epoch if cfg.epochs else 0)
    step, kept = common.resume(cfg, env, model, optimizer)
    best = kept.get('best')  # the best evaluation a resumed run had seen
    ddp_model = DDP(model) if env.ddp else model  # broadcast buffers: one set of BatchNorm statistics
    run = torch.compile(ddp_model) if cfg.compile else ddp_model
    start = step
    log = common.Logger(cfg, env, step)
    data = common.stream(loader, sampler, step, steps_per_epoch, cfg.accum)
    while step < cfg.steps:
        lr = common.get_lr(step, cfg)
        common.set_lr(optimizer, lr)
        model.train()
        for micro in range(cfg.accum):
            batch = next(data)
            sync = micro == cfg.accum - 1 or not env.ddp
            with (ddp_model.no_sync() if not sync else contextlib.nullcontext()), env.autocast():
                loss = loss_fn(run, batch)
                env.scaler.scale(loss / cfg.accum).backward()
        gnorm = common.optimizer_step(env, optimizer, cfg.clip_grad)
        step += 1
        common.check_finite(loss.item(), step, cfg)
        if (step % cfg.log_every == 0 or step == cfg.steps) and not quiet:
            log(step, cfg.steps, per_step, loss=loss.item(), lr=lr, gnorm=gnorm)
        if every and step % every == 0 and step < cfg.steps:
            best = better(best, score(model), step, metric, log if not quiet else None)
        stop = cfg.stop_after and step - start >= cfg.stop_after
        if step % cfg.ckpt_every == 0 or step == cfg.steps or stop:
            model_config = asdict(model.cfg) if isinstance(model, beitv2.ViT) else None
            common.save_checkpoint(os.path.join(cfg.out_dir, 'ckpt.pt'), env, model=model.state_dict(),
                                   optimizer=optimizer.state_dict(), scaler=env.scaler.state_dict(), step=step,
                                   config=asdict(cfg), model_config=model_config, loop=dict(best=best))
        if stop:
            return None
    final = score(model)
    best = better(best, final, step, metric, log if not quiet else None)
    return dict(final, **{f'best_{metric}': best[metric], 'best_step': best['step']})


def better(best, scores, step, metric, log):
    """The best of the evaluations so far (higher `metric`), logging this one."""
    if log is not None:
        log.scores(step, **{f'val_{k}': v for k, v in scores.items()})
    if best is None or scores[metric] > best[metric]:
        best = dict(scores, step=step)
    return best


def topk_acc(scores, y, ks=(1, 5)):
    top = scores.topk(max(ks), dim=1).indices
    return {f'top{k}': (top[:, :k] == y[:, None]).any(1).float().mean().item() * 100 for k in ks}


@torch.no_grad()
def classify(model, val, cfg, env, restrict=None):
    """Top-1 / top-5 on the val split (resize 1/0.875 + centre crop); the best head of a probe.
    restrict: the class indices that count (ImageNet-A/R), in the order of val's labels."""
    model.eval()

    def fn(x):  # -> (B, heads, classes)
        out = model(x)
        out = torch.stack(out, 1) if isinstance(out, list) else out[:, None]
        return out if restrict is None else out[..., restrict.to(out.device)]
    scores, y = extract(fn, _Mapped(val, common.eval_transform(cfg.img_size)), cfg, env)
    res = [topk_acc(scores[:, h], y) for h in range(scores.shape[1])]
    best = max(range(len(res)), key=lambda h: res[h]['top1'])
    return dict(res[best], **({'best_block': best} if len(res) > 1 else {}))


def record(cfg, env, result):  # one line of OUT_DIR/result.json (plot.py draws the compare runs)
    if env.master:
        with open(os.path.join(cfg.out_dir, 'result.json'), 'a') as f:
            f.write(json.dumps(result) + '\n')

# ----------------------------------------------------------------------------- linear probing


class LARS(torch.optim.Optimizer):
    """SGD with layer-wise adaptive rate scaling (MAE's linear probe); 1-D parameters plain SGD."""

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust=trust))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g['params']:
                if p.grad is None:
                    continue
                d = p.grad.add(p, alpha=g['weight_decay']) if p.ndim > 1 else p.grad
                if p.ndim > 1:
                    pn, dn = p.norm(), d.norm()
                    d = d * torch.where((pn > 0) & (dn > 0), g['trust'] * pn / dn, torch.ones_like(pn))
                buf = self.state[p].setdefault('mu', torch.zeros_like(p))
                p.add_(buf.mul_(g['momentum']).add_(d), alpha=-g['lr'])


class Probe(nn.Module):
    """Frozen backbone + trainable heads. mae: BatchNorm (no affine) + Linear on one feature.
    beit (official BEiT v1 linear eval): a Linear on [CLS; mean patch] of every block."""

    def __init__(self, backbone, cfg, num_classes):
        super().__init__()
        self.backbone, self.cfg = backbone.requires_grad_(False), cfg
        if isinstance(backbone, Pixels):
            D, L = backbone.dim, 1
        else:
            D, L = backbone.cfg.embed_dim, backbone.cfg.depth
        if cfg.linear_recipe == 'beit' and not isinstance(backbone, Pixels):
            self.heads = nn.ModuleList(nn.Linear(2 * D, num_classes) for _ in range(L))
        else:
            self.heads = nn.ModuleList([nn.Sequential(nn.BatchNorm1d(D, affine=False), nn.Linear(D, num_classes))])
        for m in self.heads.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01), nn.init.zeros_(m.bias)

    def forward(self, images):  # -> list of logits, one per head
        self.backbone.eval()
        with torch.no_grad():
            if len(self.heads) > 1:
                _, xs = self.backbone.forward_tokens(images, layers=range(self.backbone.cfg.depth))
                feats = [torch.cat([x[:, 0], x[:, 1:].mean(1)], 1) for x in xs]
            else:
                feats = [pooled(self.backbone, images, self.cfg)]
        return [h(f.float()) for h, f in zip(self.heads, feats)]


def run_linear(cfg, env, quiet=False):
    backbone = feature_backbone(cfg)
    train, classes = classification_data(cfg, 'train')
    val, _ = classification_data(cfg, 'val')
    model = Probe(backbone, cfg, classes).to(env.device)
    heads = [p for p in model.heads.parameters()]
    if cfg.linear_recipe == 'beit':
        optimizer = torch.optim.AdamW([dict(params=heads, weight_decay=cfg.weight_decay)], lr=cfg.lr)
    else:
        optimizer = LARS([dict(params=heads, weight_decay=cfg.weight_decay)], lr=cfg.lr)
    loader, sampler = common.make_loader(train, TrainTransform(cfg, False), cfg, env)

    def loss_fn(m, batch):
        x, y = batch[0].to(env.device), batch[1].to(env.device)
        return sum(F.cross_entropy(lg, y) for lg in m(x))
    return fit(cfg, env, model, optimizer, loader, sampler, len(train), loss_fn,
               lambda m: classify(m, val, cfg, env), quiet=quiet)

# ----------------------------------------------------------------------------- k-NN


def knn_classify(train_f, train_y, test_f, k=20, t=0.07, num_classes=None, chunk=256):
    """Weighted k-NN (DINO): cosine similarity, top-k neighbours vote with exp(sim / t)."""
    num_classes = num_classes or int(train_y.max()) + 1
    train_f, test_f = F.normalize(train_f, dim=1), F.normalize(test_f, dim=1)
    scores = []
    for q in test_f.split(chunk):
        sim, nn_idx = (q @ train_f.t()).topk(min(k, len(train_f)), dim=1)
        votes = torch.zeros(len(q), num_classes, device=q.device)
        scores.append(votes.scatter_add_(1, train_y[nn_idx], (sim / t).exp()))
    return torch.cat(scores)


def run_knn(cfg, env):
    backbone = feature_backbone(cfg).to(env.device).eval()
    train, classes = classification_data(cfg, 'train')
    val, _ = classification_data(cfg, 'val')
    ev = common.eval_transform(cfg.img_size)

    def features(x):
        return pooled(backbone, x, cfg)
    train_f, train_y = extract(features, _Mapped(train, ev), cfg, env)
    val_f, val_y = extract(features, _Mapped(val, ev), cfg, env)
    return topk_acc(knn_classify(train_f, train_y, val_f, cfg.knn_k, cfg.knn_t, classes), val_y)

# ------------------------------------------------------------- compare: both probes on every backbone (the quick start)


def run_compare(cfg, env):
    """Does pretraining help? Linear probe and k-NN top-1 of the checkpoint, of the same
    architecture at its random init, and of raw pixels, each probe with --seeds seeds (k-NN is
    deterministic except for the random init). The probes start afresh every time."""
    names = dict(checkpoint='pretrained', random='random init', pixels='raw pixels')
    _, classes = classification_data(cfg, 'val')
    table = {}
    for backbone in cfg.backbones:
        if backbone not in names:
            common.die(f'--backbones: {backbone!r} is not one of {", ".join(names)}')
        name = names[backbone]
        for seed in range(cfg.seed, cfg.seed + cfg.seeds):
            sub = replace(cfg, backbone=backbone, seed=seed, out_dir=os.path.join(cfg.out_dir, f'{backbone}_{seed}'))
            os.makedirs(sub.out_dir, exist_ok=True)
            stale = os.path.join(sub.out_dir, 'ckpt.pt')  # a probe of an earlier checkpoint
            if env.master and os.path.exists(stale):
                os.remove(stale)
            if env.ddp:
                dist.barrier()
            torch.manual_seed(seed + env.rank)  # each probe as if run alone: 1 seed or 3, the same numbers
            runs = [('linear probe', run_linear(sub, env, quiet=True)['top1'])]
            if seed == cfg.seed or backbone == 'random':
                runs.append(('k-NN', run_knn(sub, env)['top1']))
            for probe, top1 in runs:
                table.setdefault(probe, {}).setdefault(name, []).append(top1)
                env.print(f'  {probe:12s} {name:11s} seed {seed}: top-1 {top1:.1f}')
                record(cfg, env, dict(mode='compare_run', backbone=name, probe=probe, seed=seed, top1=top1,
                                      chance=100 / classes))
    mean = {p: {n: sum(v) / len(v) for n, v in row.items()} for p, row in table.items()}
    line = '; '.join(f'{p}: ' + ' | '.join(f'{n} {v:.1f}' for n, v in row.items()) for p, row in mean.items())
    env.print(f'top-1 % (chance {100 / classes:.1f}), mean of {cfg.seeds} seed(s): {line}')
    return {f'{p} {n}': v for p, row in mean.items() for n, v in row.items()}

# ----------------------------------------------------------------------------- fine-tuning


def run_finetune(cfg, env):
    sd, mcfg = load_backbone_weights(cfg)
    if cfg.robust_test:
        return robust_test(cfg, env, sd, mcfg)
    train, classes = classification_data(cfg, 'train')
    val, _ = classification_data(cfg, 'val')
    if cfg.eval_only and sd.get('head.weight', torch.empty(0)).shape[:1] != (classes,):
        common.die(f'--eval_only: {cfg.checkpoint} has no {classes}-class head (the data has {classes} classes)')
    model = build_backbone(cfg, sd, mcfg, rel_pos='per_block', fc_norm=True, num_classes=classes,
                           drop_path=cfg.drop_path).to(env.device)
    if cfg.eval_only:
        return classify(model, val, cfg, env)
    groups = beitv2.param_groups(model, cfg.weight_decay, cfg.layer_decay, model.cfg.depth)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)
    loader, sampler = common.make_loader(train, TrainTransform(cfg, True), cfg, env)
    mixes = [m for a, m in ((cfg.mixup, T2.MixUp(alpha=cfg.mixup or 1.0, num_classes=classes)),
                            (cfg.cutmix, T2.CutMix(alpha=cfg.cutmix or 1.0, num_classes=classes))) if a > 0]
    mix = T2.RandomChoice(mixes) if mixes else None  # switch probability 0.5 between the two

    def loss_fn(m, batch):
        x, y = batch[0].to(env.device), batch[1].to(env.device)
        x, soft = mix(x, y) if mix else (x, F.one_hot(y, classes).float())  # MixUp or CutMix per batch
        soft = soft * (1 - cfg.smoothing) + cfg.smoothing / classes  # label smoothing, as timm's Mixup
        return torch.sum(-soft * F.log_softmax(m(x).float(), -1), -1).mean()
    return fit(cfg, env, model, optimizer, loader, sampler, len(train), loss_fn,
               lambda m: classify(m, val, cfg, env))


# robustness (paper Table 2, official --robust_test): ImageNet-A and ImageNet-R hold 200 of the 1000
# ImageNet classes; a 1000-class model is scored with its logits restricted to those, in ImageNet
# order, which is also the sorted order of the sets' class folders. The ImageNet-1k indices of the
# 200 classes, from the official imagenet_a_r_indices.py (its masks over the sorted 1000 wnids):
IMAGENET_A = (
    6, 11, 13, 15, 17, 22, 23, 27, 30, 37, 39, 42, 47, 50, 57, 70, 71, 76, 79, 89, 90, 94, 96, 97, 99, 105,
    107, 108, 110, 113, 124, 125, 130, 132, 143, 144, 150, 151, 207, 234, 235, 254, 277, 283, 287, 291, 295,
    298, 301, 306, 307, 308, 309, 310, 311, 313, 314, 315, 317, 319, 323, 324, 326, 327, 330, 334, 335, 336,
    347, 361, 363, 372, 378, 386, 397, 400, 401, 402, 404, 407, 411, 416, 417, 420, 425, 428, 430, 437, 438,
    445, 456, 457, 461, 462, 470, 472, 483, 486, 488, 492, 496, 514, 516, 528, 530, 539, 542, 543, 549, 552,
    557, 561, 562, 569, 572, 573, 575, 579, 589, 606, 607, 609, 614, 626, 627, 640, 641, 642, 643, 658, 668,
    677, 682, 684, 687, 701, 704, 719, 736, 746, 749, 752, 758, 763, 765, 768, 773, 774, 776, 779, 780, 786,
    792, 797, 802, 803, 804, 813, 815, 820, 823, 831, 833, 835, 839, 845, 847, 850, 859, 862, 870, 879, 880,
    888, 890, 897, 900, 907, 913, 924, 932, 933, 934, 937, 943, 945, 947, 951, 954, 956, 957, 959, 971, 972,
    980, 981, 984, 986, 987, 988)
IMAGENET_R = (
    1, 2, 4, 6, 8, 9, 11, 13, 22, 23, 26, 29, 31, 39, 47, 63, 71, 76, 79, 84, 90, 94, 96, 97, 99, 100, 105,
    107, 113, 122, 125, 130, 132, 144, 145, 147, 148, 150, 151, 155, 160, 161, 162, 163, 171, 172, 178, 187,
    195, 199, 203, 207, 208, 219, 231, 232, 234, 235, 242, 245, 247, 250, 251, 254, 259, 260, 263, 265, 267,
    269, 276, 277, 281, 288, 289, 291, 292, 293, 296, 299, 301, 308, 309, 310, 311, 314, 315, 319, 323, 327,
    330, 334, 335, 337, 338, 340, 341, 344, 347, 353, 355, 361, 362, 365, 366, 367, 368, 372, 388, 390, 393,
    397, 401, 407, 413, 414, 425, 428, 430, 435, 437, 441, 447, 448, 457, 462, 463, 469, 470, 471, 472, 476,
    483, 487, 515, 546, 555, 558, 570, 579, 583, 587, 593, 594, 596, 609, 613, 617, 621, 629, 637, 657, 658,
    701, 717, 724, 763, 768, 774, 776, 779, 780, 787, 805, 812, 815, 820, 824, 833, 847, 852, 866, 875, 883,
    889, 895, 907, 928, 931, 932, 933, 934, 936, 937, 943, 945, 947, 948, 949, 951, 953, 954, 957, 963, 965,
    967, 980, 981, 983, 988)


def robust_test(cfg, env, sd, mcfg):
    """Top-1/5 of a fine-tuned 1000-class checkpoint on --data, an ImageNet-A or -R folder
    (ROOT/CLASS/image, its 200 class folders), with the logits restricted to that set's classes."""
    classes = {'imagenet_a': IMAGENET_A, 'imagenet_r': IMAGENET_R}.get(cfg.robust_test)
    if classes is None:
        common.die(f'--robust_test must be imagenet_a or imagenet_r, got {cfg.robust_test!r}')
    if not cfg.eval_only:
        common.die('--robust_test scores a fine-tuned model: pass --eval_only=True')
    if sd.get('head.weight', torch.empty(0)).shape[:1] != (1000,):
        common.die(f'--robust_test: {cfg.checkpoint} has no 1000-class (ImageNet) head')
    try:
        val = torchvision.datasets.ImageFolder(cfg.data, loader=common.load_image)
    except (FileNotFoundError, OSError) as e:
        common.die(f'--robust_test: {cfg.data}: {e}')
    if len(val.classes) != len(classes):
        common.die(f'--robust_test: {cfg.data} has {len(val.classes)} class folders, {cfg.robust_test} has '
                   f'{len(classes)} (expected ROOT/CLASS/image)')
    model = build_backbone(cfg, sd, mcfg, rel_pos='per_block', fc_norm=True, num_classes=1000).to(env.device)
    return classify(model, val, cfg, env, restrict=torch.tensor(classes))

# ---------------------------------------------------------- segmentation: UperNet on the ViT (official ADE20K protocol)


def conv_bn_relu(cin, cout, k):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True))


class Segmenter(nn.Module):
    """Official BEiT segmentation: block features -> 4 scales (strides 4, 8, 16, 32) -> UperNet
    (pyramid pooling 1/2/3/6 + FPN fusion) and an auxiliary FCN head on the stride-16 scale."""

    def __init__(self, backbone, layers, num_classes, channels=None):
        super().__init__()
        D = backbone.cfg.embed_dim
        c = channels or D
        self.backbone, self.layers = backbone, tuple(layers)
        # no final norm, no blocks past the last one read: every parameter gets a gradient (DDP)
        backbone.norm = backbone.fc_norm = None
        del backbone.blocks[max(layers) + 1:]
        self.fpn1 = nn.Sequential(nn.ConvTranspose2d(D, D, 2, 2), nn.BatchNorm2d(D), nn.GELU(),
                                  nn.ConvTranspose2d(D, D, 2, 2))
        self.fpn2 = nn.ConvTranspose2d(D, D, 2, 2)
        self.fpn4 = nn.MaxPool2d(2)
        self.ppm = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_bn_relu(D, c, 1)) for s in (1, 2, 3, 6))
        self.bottleneck = conv_bn_relu(D + 4 * c, c, 3)
        self.lateral = nn.ModuleList(conv_bn_relu(D, c, 1) for _ in range(3))
        self.fpn_convs = nn.ModuleList(conv_bn_relu(c, c, 3) for _ in range(3))
        self.fuse = conv_bn_relu(4 * c, c, 3)
        self.cls = nn.Sequential(nn.Dropout2d(0.1), nn.Conv2d(c, num_classes, 1))
        self.aux = nn.Sequential(conv_bn_relu(D, 256, 3), nn.Dropout2d(0.1), nn.Conv2d(256, num_classes, 1))
        for name, m in self.named_modules():  # mmseg's init of the heads; the backbone keeps its weights
            if isinstance(m, nn.Conv2d) and not name.startswith('backbone'):
                if m.out_channels == num_classes:  # conv_seg: N(0, 0.01)
                    nn.init.normal_(m.weight, std=0.01)
                    nn.init.zeros_(m.bias)
                else:                              # ConvModule: kaiming normal, fan_out, relu
                    nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')

    def forward(self, images):  # -> (logits, aux logits), each (B, classes, H, W)
        _, xs = self.backbone.forward_tokens(images, layers=self.layers)
        h, w = self.backbone.grid
        f = [x[:, 1:].transpose(1, 2).reshape(x.shape[0], -1, h, w) for x in xs]   # (B, D, h, w)
        f = [self.fpn1(f[0]), self.fpn2(f[1]), f[2], self.fpn4(f[3])]              # strides 4..32
        top = f[3]
        lat = [conv(x) for conv, x in zip(self.lateral, f[:3])]
        lat.append(self.bottleneck(torch.cat([top] + [F.interpolate(p(top), top.shape[2:], mode='bilinear')
                                                      for p in self.ppm], 1)))
        for i in range(3, 0, -1):                                                  # top-down path
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], lat[i - 1].shape[2:], mode='bilinear')
        outs = [conv(x) for conv, x in zip(self.fpn_convs, lat[:3])] + [lat[3]]
        outs = [F.interpolate(o, outs[0].shape[2:], mode='bilinear') for o in outs]
        logits, aux = self.cls(self.fuse(torch.cat(outs, 1))), self.aux(f[2])
        size = images.shape[2:]
        return F.interpolate(logits, size, mode='bilinear'), F.interpolate(aux, size, mode='bilinear')


class SegData(torch.utils.data.Dataset):
    """(image, mask) pairs: demo shapes, ADE20K (ROOT/images|annotations/training|validation,
    150 classes with reduce_zero_label: 0 -> ignore 255) or torchvision's VOCSegmentation."""

    def __init__(self, spec, split, img_size):
        name, _, root = spec.partition(':')
        self.reduce_zero = name == 'ade20k'
        if name == 'demo':
            self.items = common.DemoTextures(split, size=img_size, masks=True)
            self.num_classes = len(common.DemoTextures.classes) + 1
        elif name == 'ade20k':
            sub = 'training' if split == 'train' else 'validation'
            folder = os.path.join(root, 'images', sub)
            if not os.path.isdir(folder):
                common.die(f'ADE20K: {folder} does not exist (expected ROOT/images/{sub} and ROOT/annotations/{sub})')
            names = sorted(f[:-4] for f in os.listdir(folder) if f.endswith('.jpg'))
            self.items = [(os.path.join(folder, n + '.jpg'), os.path.join(root, 'annotations', sub, n + '.png'))
                          for n in names]
            self.num_classes = 150
        elif name == 'voc':
            import torchvision.datasets as tvd
            try:
                self.items = tvd.VOCSegmentation(root, image_set='train' if split == 'train' else 'val')
            except RuntimeError as e:
                common.die(f'VOC: {e}')
            self.num_classes = 21
        else:
            common.die(f'segmentation data must be demo, ade20k:ROOT or voc:ROOT, got {spec!r}')

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        item = self.items[i]
        if isinstance(item[0], str):
            item = common.load_image(item[0]), Image.open(item[1])
        img, mask = item
        mask = torch.as_tensor(np.array(mask), dtype=torch.long)
        if self.reduce_zero:  # ADE20K: 0 = "other" is ignored, classes 1..150 -> 0..149
            mask = torch.where(mask == 0, 255, mask - 1)
        return common.rgb(img), mask


def fit_size(h, w, long, short):
    """mmcv's imrescale (mmseg's Resize, keep_ratio): the largest (h, w) of the same aspect with
    the long side <= long and the short side <= short."""
    f = min(long / max(h, w), short / min(h, w))
    return int(h * f + 0.5), int(w * f + 0.5)


def photometric_distortion(img, rng, brightness=32, contrast=(0.5, 1.5), saturation=(0.5, 1.5), hue=18):
    """mmseg 0.x's PhotoMetricDistortion on a uint8 (3, H, W) image: each step with probability 0.5,
    in its order: brightness +- 32, contrast x 0.5-1.5 (before or after the colour steps, at random),
    saturation x 0.5-1.5 and hue +- 18 of OpenCV's 180 (computed in float here: mmseg rounds through
    OpenCV's uint8 HSV, a difference of a level at most)."""
    def convert(x, alpha=1.0, beta=0.0):  # mmseg's convert: scale, shift, clip, back to uint8
        return (x.float() * alpha + beta).clamp(0, 255).to(torch.uint8)
    if rng.randint(0, 1):
        img = convert(img, beta=rng.uniform(-brightness, brightness))
    contrast_first = rng.randint(0, 1)
    if contrast_first and rng.randint(0, 1):
        img = convert(img, alpha=rng.uniform(*contrast))
    if rng.randint(0, 1):  # HSV saturation x alpha at the same hue and value: each channel moves from V
        x = img.float()
        v, low = x.max(0).values, x.min(0).values
        sat = torch.where(v > 0, (v - low) / v.clamp(min=1), torch.zeros_like(v))
        new = (sat * rng.uniform(*saturation)).clamp(max=1)
        ratio = torch.where(sat > 0, new / sat.clamp(min=1e-12), torch.ones_like(sat))
        img = (v - (v - x) * ratio).round().clamp(0, 255).to(torch.uint8)
    if rng.randint(0, 1):
        img = T.functional.adjust_hue(img, rng.randint(-hue, hue - 1) / 180)  # numpy's randint excludes hue
    if not contrast_first and rng.randint(0, 1):
        img = convert(img, alpha=rng.uniform(*contrast))
    return img


class SegTransform:
    """The official mmseg 0.x ADE20K pipeline at crop size S (512 there), with ratios kept for
    other sizes. Train: resize to fit (4S, S) x U(0.5, 2), aspect kept (bilinear; masks nearest);
    an S x S crop, drawn again (up to 10 times) while one class covers >= cat_max_ratio of its
    labelled pixels; flip; photometric distortion; normalise; pad bottom/right to S (image 0 = the
    mean colour after normalising, mask 255). Eval: resize to fit (4S, S); the mask is returned at
    its original size, where the prediction is scored."""

    def __init__(self, size, train, cat_max_ratio=0.75):
        self.size, self.train, self.cat_max_ratio = size, train, cat_max_ratio
        self.norm = T.Normalize(common.IMAGENET_MEAN, common.IMAGENET_STD)

    def resize(self, img, mask, ratio=1.0):
        h, w = fit_size(*img.shape[1:], 4 * self.size * ratio, self.size * ratio)
        img = T.functional.resize(img, [h, w], T.InterpolationMode.BILINEAR, antialias=False)
        return img, T.functional.resize(mask[None], [h, w], T.InterpolationMode.NEAREST)[0]

    def crop_box(self, mask, rng):
        S, (H, W) = self.size, mask.shape
        for _ in range(10):  # mmseg: a first box, then up to 10 redraws
            y, x = rng.randint(0, max(H - S, 0)), rng.randint(0, max(W - S, 0))
            labels = mask[y:y + S, x:x + S]
            counts = torch.bincount(labels[labels != 255].flatten())
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                break
        return y, x

    def __call__(self, item, rng):
        img, mask = T.functional.pil_to_tensor(common.rgb(item[0])), item[1]
        if not self.train:
            return self.norm(self.resize(img, mask)[0].float() / 255), mask
        img, mask = self.resize(img, mask, rng.uniform(0.5, 2.0))
        y, x = self.crop_box(mask, rng)
        img, mask = img[:, y:y + self.size, x:x + self.size], mask[y:y + self.size, x:x + self.size]
        if rng.random() < 0.5:
            img, mask = img.flip(-1), mask.flip(-1)
        img = self.norm(photometric_distortion(img, rng).float() / 255)
        pad = (0, self.size - img.shape[2], 0, self.size - img.shape[1])  # bottom / right
        return F.pad(img, pad, value=0.0), F.pad(mask, pad, value=255)


def seg_loss(logits, target):
    """Cross entropy averaged over ALL pixels, the ignored ones (255) counted as 0: mmseg 0.x's
    default (avg_non_ignore=False), which the official segmentation code uses."""
    return F.cross_entropy(logits.float(), target, ignore_index=255, reduction='none').mean()


@torch.no_grad()
def sliding_window(model, image, num_classes, crop, stride):
    """Logits (classes, H, W) of one image: windows of crop x crop every `stride`, averaged."""
    _, H, W = image.shape
    ph, pw = max(crop - H, 0), max(crop - W, 0)
    image = F.pad(image, (0, pw, 0, ph))
    Hp, Wp = image.shape[1:]
    out = image.new_zeros(num_classes, Hp, Wp)
    count = image.new_zeros(1, Hp, Wp)
    for y in sorted({min(y, Hp - crop) for y in range(0, max(Hp - crop, 0) + stride, stride)}):
        for x in sorted({min(x, Wp - crop) for x in range(0, max(Wp - crop, 0) + stride, stride)}):
            out[:, y:y + crop, x:x + crop] += model(image[None, :, y:y + crop, x:x + crop])[0][0].float()
            count[:, y:y + crop, x:x + crop] += 1
    return (out / count)[:, :H, :W]


def confusion(pred, target, num_classes, ignore=255):
    keep = target != ignore
    return torch.bincount(target[keep] * num_classes + pred[keep], minlength=num_classes ** 2).view(num_classes, -1)


def miou(conf):
    """Mean IoU over the classes that occur (in the target or the prediction)."""
    conf = conf.double()
    inter, union = conf.diag(), conf.sum(0) + conf.sum(1) - conf.diag()
    return (inter[union > 0] / union[union > 0]).mean().item() * 100


@torch.no_grad()
def segment_score(model, val, cfg, env):
    """mIoU on the val split as mmseg scores it: the image resized to fit (4S, S), sliding windows
    of the crop size S, the logits resized (bilinear) back to the original mask's size."""
    model.eval()
    t = SegTransform(cfg.img_size, False)
    conf = torch.zeros(val.num_classes, val.num_classes, dtype=torch.long, device=env.device)
    for i in range(env.rank, len(val), env.world):
        img, mask = t(val[i], None)
        with env.autocast():
            logits = sliding_window(model, img.to(env.device), val.num_classes, cfg.img_size,
                                    cfg.seg_stride or cfg.img_size * 2 // 3)
        logits = F.interpolate(logits[None].float(), size=mask.shape, mode='bilinear', align_corners=False)[0]
        conf += confusion(logits.argmax(0).flatten(), mask.to(env.device).flatten(), val.num_classes)
    return dict(mIoU=miou(env.all_reduce(conf)))


def run_segment(cfg, env):
    sd, mcfg = load_backbone_weights(cfg)
    train, val = SegData(cfg.data, 'train', cfg.img_size), SegData(cfg.data, 'val', cfg.img_size)
    backbone = build_backbone(cfg, sd, mcfg, rel_pos='per_block', fc_norm=True, num_classes=0,
                              drop_path=cfg.drop_path)
    if len(cfg.seg_layers) != 4 or max(cfg.seg_layers) >= backbone.cfg.depth:
        common.die(f'--seg_layers needs 4 block indices below {backbone.cfg.depth}, got {cfg.seg_layers}')
    model = Segmenter(backbone, cfg.seg_layers, train.num_classes).to(env.device)
    if env.ddp and env.device.type == 'cuda':
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # official mmseg run: 'backbone.cls_token' misses its no-decay name test, so it IS decayed
    groups = beitv2.param_groups(model, cfg.weight_decay, cfg.layer_decay, backbone.cfg.depth, no_decay=())
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)
    loader, sampler = common.make_loader(train, SegTransform(cfg.img_size, True), cfg, env, joint=True)

    def loss_fn(m, batch):
        x, y = batch[0].to(env.device), batch[1].to(env.device)
        top = int(y.masked_fill(y == 255, 0).max())
        if top >= train.num_classes:
            common.die(f'mask class {top} exceeds the head ({train.num_classes} classes)')
        logits, aux = m(x)
        return seg_loss(logits, y) + 0.4 * seg_loss(aux, y)  # auxiliary FCN head, weight 0.4
    return fit(cfg, env, model, optimizer, loader, sampler, len(train), loss_fn,
               lambda m: segment_score(m, val, cfg, env), metric='mIoU')

# -------------------------------------------------------------------------- look inside a backbone: a patch's attention


def picture_input(cfg, img_size, normalize):
    """The image of --image (or the first val image of --data), resized to img_size/0.875 and
    centre-cropped: (1, 3, S, S), and the same in [0, 1] for drawing."""
    if cfg.image:
        if not os.path.exists(cfg.image):
            common.die(f'--image {cfg.image!r} not found')
        try:
            img = common.load_image(cfg.image)
        except RuntimeError as e:
            common.die(str(e))
    else:
        img = common.rgb(common.build_dataset(cfg.data, 'val', img_size)[0][0])
    shown = common.eval_transform(img_size, normalize=False)(img)[None]
    return (common.eval_transform(img_size)(img)[None] if normalize else shown), shown


@torch.no_grad()
def attention_probs(backbone, images, layer):
    """(B, nh, N, N) softmax attention of block `layer` (0-based), token 0 = [CLS]: the same
    logits the block computes (q/v biases, scale, relative position bias)."""
    x = backbone.embed(images) if layer == 0 else backbone.forward_tokens(images, layers=(layer - 1,))[1][0]
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
    from torchvision.utils import save_image
    sd, mcfg = load_weights(cfg.checkpoint)
    backbone = build_backbone(cfg, sd, mcfg, num_classes=0, drop_path=0.0).to(env.device).eval()
    h, w = backbone.grid
    p = backbone.cfg.patch_size
    if cfg.query == 'cls':
        row = col = None
    else:
        try:
            row, col = (int(v) for v in cfg.query.split(','))
        except ValueError:
            common.die(f'--query must be cls or ROW,COL, got {cfg.query!r}')
        if not (0 <= row < h and 0 <= col < w):
            common.die(f'--query {row},{col} is outside the {h}x{w} patch grid')
    layer = cfg.layer % backbone.cfg.depth
    x, shown = picture_input(cfg, cfg.img_size, normalize=True)
    probs = attention_probs(backbone, x.to(env.device), layer)[0].float().cpu()  # (nh, N, N)
    q = 0 if row is None else 1 + row * w + col
    maps = probs[:, q, 1:].view(-1, h, w)                                  # (nh, h, w) over patches
    maps = maps / maps.flatten(1).max(1).values[:, None, None]             # each head to [0, 1]
    box = None if row is None else (row, col, p)
    tiles = [shown[0]] + [heat(shown[0], m, box) for m in maps]
    scale = max(1, 128 // cfg.img_size)
    out = F.interpolate(torch.stack(tiles), scale_factor=scale, mode='nearest')
    path = os.path.join(cfg.out_dir, 'attention.png')
    save_image(out, path, nrow=len(tiles), padding=2, pad_value=1)
    top = [int(m.flatten().argmax()) for m in maps]
    return dict(png=path, layer=layer, query=cfg.query, heads=len(maps),
                peak=' '.join(f'{t // w},{t % w}' for t in top))

# ----------------------------------------------------------------------------- look inside a tokenizer: codebook, codes


def tokenizer_of(cfg, env):
    """--checkpoint as a frozen tokenizer, or a one-line error."""
    try:
        return beitv2.load_tokenizer(cfg.checkpoint).to(env.device)
    except (ValueError, KeyError, FileNotFoundError) as e:
        common.die(f'{cfg.checkpoint}: {e}')


def code_colours(n_codes):  # (K, 3) one fixed random colour per code, the same in every picture
    return torch.rand(n_codes, 3, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def run_codebook(cfg, env, n_images=512, n_codes=16, per_code=16):
    """The paper's codebook picture: image patches grouped by the code they get (the most used
    codes, one row each), and token maps (each code a colour) beside a few images."""
    from torchvision.utils import save_image
    tok = tokenizer_of(cfg, env)
    val = common.build_dataset(cfg.data, 'val', cfg.img_size)
    ev = common.eval_transform(tok.cfg.img_size, normalize=False)
    images = torch.stack([ev(common.rgb(val[i][0])) for i in range(min(n_images, len(val)))]).to(env.device)
    codes = torch.cat([tok.encode(x) for x in images.split(cfg.batch_size)])   # (n, N)
    p, (h, w) = tok.cfg.patch_size, tok.grid
    patches = images.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(-1, 3, p, p)
    flat = codes.flatten()
    top = torch.bincount(flat, minlength=tok.cfg.codebook_size).topk(n_codes).indices
    rows = []
    for c in top:
        hits = patches[flat == c][:per_code]
        rows.append(torch.cat([hits, hits.new_ones(per_code - len(hits), 3, p, p)]))
    os.makedirs(cfg.out_dir, exist_ok=True)
    grid_img = torch.cat(rows)
    grid_img = F.interpolate(grid_img, scale_factor=max(1, 32 // p), mode='nearest')  # small patches: enlarge
    save_image(grid_img, os.path.join(cfg.out_dir, 'codebook.png'), nrow=per_code, padding=2, pad_value=1)
    palette = code_colours(tok.cfg.codebook_size).to(env.device)
    maps = palette[codes[:8]].view(-1, h, w, 3).permute(0, 3, 1, 2)
    maps = F.interpolate(maps, size=images.shape[2:], mode='nearest')
    pairs = torch.stack([images[:8], maps], 1).flatten(0, 1)
    pairs = F.interpolate(pairs, scale_factor=max(1, 128 // pairs.shape[-1]), mode='nearest')
    save_image(pairs, os.path.join(cfg.out_dir, 'token_maps.png'), nrow=4, padding=2, pad_value=1)
    used = int((torch.bincount(flat, minlength=tok.cfg.codebook_size) > 0).sum())
    return dict(codes_used=used, images=len(images), png=os.path.join(cfg.out_dir, 'codebook.png'))


@torch.no_grad()
def run_codes(cfg, env):
    """Official test_get_code.py: the tokenizer's code of every patch of one image (resize
    img_size/0.875, centre crop, values in [0, 1]), printed as a grid, and a picture of the image
    beside its code map (each code one colour; the colours of --mode=codebook's token maps)."""
    from torchvision.utils import save_image
    tok = tokenizer_of(cfg, env)
    _, shown = picture_input(cfg, tok.cfg.img_size, normalize=False)
    codes = tok.encode(shown.to(env.device))[0].cpu()                      # (n,)
    h, w = tok.grid
    width = len(str(tok.cfg.codebook_size - 1))
    env.print('\n'.join(' '.join(f'{c:{width}d}' for c in row) for row in codes.view(h, w).tolist()))
    palette = code_colours(tok.cfg.codebook_size)
    code_map = palette[codes].view(h, w, 3).permute(2, 0, 1)
    code_map = F.interpolate(code_map[None], size=shown.shape[2:], mode='nearest')
    pair = F.interpolate(torch.cat([shown, code_map]), scale_factor=max(1, 128 // shown.shape[-1]), mode='nearest')
    path = os.path.join(cfg.out_dir, 'codes.png')
    save_image(pair, path, nrow=2, padding=2, pad_value=1)
    return dict(png=path, grid=f'{h}x{w}', distinct_codes=len(codes.unique()))


def main(argv=None):
    cfg = common.configure(Config(), PRESETS, argv)
    modes = dict(linear=run_linear, knn=run_knn, compare=run_compare, finetune=run_finetune, segment=run_segment,
                 attention=run_attention, codebook=run_codebook, codes=run_codes)
    if cfg.mode not in modes:
        common.die(f'--mode must be one of {", ".join(modes)}')
    if not cfg.data or not cfg.checkpoint:
        common.die('--data and --checkpoint are required for this preset')
    if cfg.schedule not in ('cosine', 'poly', 'cosine_epoch'):
        common.die(f'--schedule must be cosine, poly or cosine_epoch, got {cfg.schedule!r}')
    if cfg.schedule == 'cosine_epoch' and not cfg.epochs:
        common.die('--schedule=cosine_epoch steps once per epoch: give --epochs')
    env = common.Env(cfg)
    common.claim_out_dir(cfg, env)
    result = modes[cfg.mode](cfg, env)
    if result is not None and cfg.mode != 'compare':  # compare printed its own table
        env.print(f'{cfg.mode}: ' + ', '.join(f'{k} {v:.2f}' if isinstance(v, float) else f'{k} {v}'
                                              for k, v in result.items()))
    if result is not None:
        record(cfg, env, dict(mode=cfg.mode, checkpoint=cfg.checkpoint, backbone=cfg.backbone, **result))
    env.close()
    return result


if __name__ == '__main__':
    main()
