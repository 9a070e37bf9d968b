"""Stage 3: evaluate a pretrained backbone (ours or an official file) by linear probing, k-NN,
fine-tuning (with the ImageNet-A/R robustness test) or semantic segmentation. The modes, in the
order this file holds them (pictures.py looks inside a backbone or a tokenizer):

    python evaluate.py                            # compare: both probes, 3 backbones
    python evaluate.py --mode=linear | knn        # one probe on the --backbone
    python evaluate.py --mode=finetune | segment
    torchrun --nproc_per_node=8 evaluate.py --preset=finetune_base --data=/data/imagenet \
--checkpoint=beitv2_base_patch16_224_pt1k.pth Settings are --key=value (`--help` lists them);
README.md has the recipes.
"""
import json
import os
import re
import shutil
from dataclasses import dataclass, replace
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')  # before torch loads OpenMP: idle threads sleep

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms.v2 as T2

import beitv2
import data
import engine
import settings
import upernet
from settings import above, at_least, die, half_open, input_file, one_of, rule, within


@dataclass
class Config(settings.Run):
    # compare: both probes on three backbones side by side | linear probe | k-NN | fine-tuning |
    # semantic segmentation
    mode: str = one_of('compare', 'linear', 'knn', 'finetune', 'segment')
    # ours or official: pretraining, fine-tuned, or a segmentation file with --eval_only
    checkpoint: str = input_file('out/pretrain/ckpt.pt')
    img_size: int = at_least(1, None)  # the input size; None: the size --checkpoint was trained at
    # RandomResizedCrop's smallest area, linear probing and fine-tuning
    min_crop_scale: float = above(0, 0.5)
    # the labelled training images a trained mode uses: all, or few (a low-label run), drawn class
    # by class from --seed
    labels: str = rule('all', 'all, a share of each class (10%) or a count per class (60)',
                       lambda v: re.fullmatch(r'all|[1-9]\d*(\.\d+)?%|[1-9]\d*', v))
    # checkpoint | random: its architecture at the official init (what pretraining started from) |
    # pixels: the raw pixels, no network
    backbone: str = one_of('checkpoint', 'random', 'pixels')
    # probes: [CLS] after the final norm (the paper's) | the mean patch token
    feature: str = one_of('cls', 'mean')
    layer: int = -1  # probes: the block whose tokens are read (0-based); -1 = the last
    # mae: BatchNorm + a linear layer, LARS | beit: AdamW, a head per block (BEiT v1)
    linear_recipe: str = one_of('mae', 'beit')
    knn_k: int = at_least(1, 20)  # neighbours that vote
    knn_t: float = above(0, 0.07)  # the temperature of the neighbours' votes
    # compare: the backbones it sets side by side
    backbones: tuple = rule(('checkpoint', 'random', 'pixels'),
                            'some of checkpoint, random, pixels',
                            lambda v: v and {*v} <= {'checkpoint', 'random', 'pixels'})
    # compare: the probes run with seeds seed, seed+1, ...; the mean is reported
    seeds: int = at_least(1, 1)
    # fine-tuning: block i (from 0) trains at lr x layer_decay ** (depth - i)
    layer_decay: float = within(0.65, 0, 1)
    # fine-tuning: stochastic depth rate of the last block (linear in depth)
    drop_path: float = half_open(0.1, 0, 1)
    mixup: float = at_least(0, 0.8)  # fine-tuning: Beta(a, a) mixing of image pairs; 0 = off
    cutmix: float = at_least(0, 1.0)  # fine-tuning: Beta(a, a) box pasting; 0 = off
    smoothing: float = half_open(0.1, 0, 1)  # fine-tuning: label smoothing
    reprob: float = within(0.25, 0, 1)  # fine-tuning: random erasing probability
    randaug: bool = True  # fine-tuning: timm's RandAugment rand-m9-mstd0.5-inc1 (the official --aa)
    eval_only: bool = False  # score --checkpoint on the val split, no training
    # False: no val split, train only (the 21k presets; official --disable_eval_during_finetuning)
    validate: bool = True
    # finetune --eval_only: --data is that set's folder
    robust_test: str = one_of('', 'imagenet_a', 'imagenet_r')
    # training modes: score the val split every N steps too (in the log: val_*; the result: the
    # final and the best); None: each epoch of an --epochs recipe, else only at the end
    eval_every: int = at_least(0, None)
    # segmentation: the blocks feeding the 4 scales (official base: 3, 5, 7, 11)
    seg_layers: tuple = rule((1, 2, 3, 5), '4 block indices', lambda v: len(v) == 4 and
                             all(type(i) is int and i >= 0 for i in v))
    # segmentation: the sliding window's stride at test time; 0 = 2/3 of img_size
    seg_stride: int = at_least(0, 0)
    # optimizer steps in all (a resumed run counts the ones done); None: --epochs of them
    steps: int = at_least(1, 300)
    # linear warmup of the lr from 0; None: --warmup_epochs of them
    warmup_steps: int = at_least(0, 30)
    # peak lr, absolute; the demo's LARS needs more than MAE's 0.1 x batch / 256
    lr: float = above(0, 4.0)
    min_lr: float = at_least(0, 0.0)  # the lr at the last step
    weight_decay: float = at_least(0, 0.0)  # the optimizer's
    out_dir: str = ''  # '' = out/eval/MODE (out/eval/MODE_BACKBONE for random and pixels)


IN1K = dict(data='', checkpoint='', img_size=224, min_crop_scale=0.08, workers=10, log_every=100,
            ckpt_every=5000)
EPOCHS = dict(IN1K, steps=None, warmup_steps=None)  # the recipes whose length is their --epochs
# fine-tuning, official get_started_for_image_classification.md: 8 GPUs; batch: GPUs x batch x accum
FT = dict(EPOCHS, mode='finetune', min_lr=1e-6, weight_decay=0.05, recipe_batch=1024)
FT_BASE = dict(FT, batch_size=128, epochs=100, warmup_epochs=20, lr=5e-4)  # 8 x 128
FT_LARGE = dict(FT, batch_size=64, accum=2, epochs=50, warmup_epochs=5, layer_decay=0.8,
                drop_path=0.2)  # 8 x 64 x update_freq 2
# intermediate fine-tuning on ImageNet-21k (21841 classes, no val split): 32 GPUs x 128 = 4096 (8
# GPUs: accum 4)
FT_21K = dict(FT, batch_size=128, accum=4, recipe_batch=4096, epochs=90, warmup_epochs=20, lr=6e-4,
              layer_decay=0.75, validate=False)
# segmentation, official semantic_segmentation/configs/beit/upernet/upernet_beit_*_512_slide_160k_
# *.py: UperNet on ADE20K, 8 GPUs x 2 images of 512, 160k iterations, poly schedule, 1500 warmup,
# slide 341, scored every 16k
SEG = dict(IN1K, mode='segment', img_size=512, batch_size=2, recipe_batch=16, steps=160000,
           warmup_steps=1500, weight_decay=0.05, seg_stride=341, schedule='poly', eval_every=16000)
SEG_BASE = dict(SEG, seg_layers=(3, 5, 7, 11), lr=5e-5, drop_path=0.15)
SEG_LARGE = dict(SEG, seg_layers=(7, 11, 15, 23), layer_decay=0.9, drop_path=0.2)
PRESETS = {
    'demo': {},
    'demo_finetune': dict(mode='finetune', lr=1e-3, weight_decay=0.05, steps=300, warmup_steps=30),
    'demo_segment': dict(mode='segment', lr=1e-3, weight_decay=0.05, layer_decay=0.9, steps=300,
                         schedule='poly'),
    # Fashion-MNIST (--data=fashion_mnist:ROOT), docs/results.md: ~1 epoch, light augmentation,
    # scored every 200 steps
    'fmnist_finetune': dict(mode='finetune', lr=1e-3, weight_decay=0.05, steps=1000,
                            warmup_steps=100, layer_decay=0.75, mixup=0.0, cutmix=0.0,
                            randaug=False, reprob=0.0, min_crop_scale=0.8, eval_every=200),
    # MAE linear protocol: batch 16384 with LARS, lr 0.1 x batch / 256, 90 epochs, 10 warmup
    'linear_base': dict(EPOCHS, mode='linear', batch_size=1024, accum=2, recipe_batch=16384,
                        epochs=90, warmup_epochs=10, lr=6.4),
    # official BEiT v1 run_linear_eval.py
    'linear_beit': dict(EPOCHS, mode='linear', linear_recipe='beit', batch_size=128,
                        epochs=100, lr=4e-3, weight_decay=1e-4, schedule='cosine_epoch'),
    'knn_base': dict(IN1K, mode='knn', batch_size=256),
    # from the pretrained model: layer decay 0.6 after 1600 epochs, 0.65 after 300
    'finetune_base': dict(FT_BASE, layer_decay=0.6, drop_path=0.2),
    'finetune_base_300': dict(FT_BASE, layer_decay=0.65, drop_path=0.1),
    'finetune_large': dict(FT_LARGE, lr=2e-4),
    'finetune_large_300': dict(FT_LARGE, lr=5e-4),
    'finetune_21k_base': dict(FT_21K, drop_path=0.1),
    'finetune_21k_large': dict(FT_21K, drop_path=0.2),
    # then ImageNet-1k from the 21k model, no mixup or cutmix
    'finetune_21kto1k_base': dict(FT, batch_size=128, epochs=30, warmup_epochs=20, lr=5e-5,
                                  layer_decay=0.75, drop_path=0.1, mixup=0.0, cutmix=0.0),
    'finetune_21kto1k_large': dict(FT_LARGE, epochs=20, lr=7e-5, drop_path=0.25, mixup=0.0,
                                   cutmix=0.0),
    'segment_base': dict(SEG_BASE, layer_decay=0.75),
    'segment_base_21ktoade20k': dict(SEG_BASE, layer_decay=0.85),
    'segment_large': dict(SEG_LARGE, lr=4e-5),
    'segment_large_21ktoade20k': dict(SEG_LARGE, lr=3e-5),
}

# ------------------------------------------------------------------- backbones


def random_arch(cfg):
    """--backbone=random: the architecture of --checkpoint, one of our pretraining files."""
    arch = engine.read_checkpoint(cfg.checkpoint).get('model_config')
    if not isinstance(arch, dict) or 'vocab_size' not in arch:
        die('--backbone=random needs one of our pretraining checkpoints (it reads the '
            'architecture)')
    return arch


def load_backbone(cfg, **changes):
    """The ViT --backbone names: the checkpoint's, or (random) the same architecture at the official
    init, what pretraining started from; `changes` as beitv2.load_backbone's."""
    ckpt = None  # read from --checkpoint
    if cfg.backbone == 'random':
        arch = random_arch(cfg)
        torch.manual_seed(cfg.seed)
        ckpt = dict(model=beitv2.BEiTv2(beitv2.BEiTConfig(**arch)).state_dict(), model_config=arch)
    return engine.read_backbone(cfg.checkpoint, ckpt, img_size=cfg.img_size, **changes)


Pixels = nn.Flatten  # the raw-pixel baseline: the (normalised) image itself is the feature vector


def feature_backbone(cfg):
    """What linear probing and k-NN read features from: the checkpoint's ViT, the same ViT at its
    random init, or raw pixels (--backbone)."""
    if cfg.backbone == 'pixels':
        return Pixels()
    backbone = load_backbone(cfg)
    try:
        beitv2.block_index(cfg.layer, backbone.cfg.depth)
    except ValueError as e:
        die(f'--layer: {e}')
    return backbone


def pooled(backbone, images, cfg):
    """The feature a probe reads: the pixels, or --feature of block --layer."""
    if isinstance(backbone, Pixels):
        return backbone(images)
    return backbone.features(images, cfg.feature, cfg.layer)

# -------------------------------------------------------- what the modes share


def train(cfg, env, model, optimizer, dataset, transform, loss, val, score):
    """A trained mode's run: its loader and plan, then engine.fit (its result). loss(model, x, y):
    a batch's loss, on the device; score(model, val, cfg, env): the val split's scores (val None:
    no scoring)."""
    if cfg.labels != 'all':
        dataset = data.labelled(dataset, cfg.labels, cfg.seed)
        env.print(f'labels: {len(dataset)} training images, {cfg.labels} of each class')
    loader = data.make_loader(dataset, transform, cfg, env)
    steps_per_epoch = engine.plan(cfg, env, loader, optimizer)
    if cfg.eval_every is None:  # each epoch of an epoch recipe, as the official fine-tuning
        cfg.eval_every = steps_per_epoch if cfg.epochs else 0

    def train_step(model, batch):
        x, y = (t.to(env.device) for t in batch)
        return loss(model, x, y), {}

    def scores(model):
        return score(model, val, cfg, env)
    return engine.fit(cfg, env, model, optimizer, loader, train_step,
                      None if val is None else scores)


def topk_acc(scores, y, ks=(1, 5)):  # top-k for each k that is at most the number of classes
    ks = [k for k in ks if k <= scores.shape[1]]
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
        if restrict is not None:
            out = out[..., restrict.to(out.device)]
        return out
    scores, y = engine.gather(fn, data.Mapped(val, data.eval_transform(cfg.img_size)), cfg, env,
                              'scoring the val split')
    res = [topk_acc(head, y) for head in scores.unbind(1)]
    if len(res) == 1:
        return res[0]
    best = max(range(len(res)), key=lambda h: res[h]['top1'])
    return dict(res[best], best_block=best)


def record(cfg, env, result):  # one line of OUT_DIR/result.json (plot.py draws the compare runs)
    if env.master:
        with open(os.path.join(cfg.out_dir, 'result.json'), 'a') as f:
            f.write(json.dumps(result) + '\n')

# -------------------------------------------------------------- linear probing


class LARS(torch.optim.Optimizer):
    """SGD with layer-wise adaptive rate scaling (MAE's linear probe); 1-D parameters plain SGD."""

    def __init__(self, params, lr=0.0):  # MAE's: momentum 0.9, trust coefficient 0.001
        super().__init__(params, dict(lr=lr, weight_decay=0.0, momentum=0.9, trust=0.001))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g['params']:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    d = d.add(p, alpha=g['weight_decay'])
                    pn, dn = p.norm(), d.norm()
                    trust = g['trust'] * pn / dn
                    d = d * torch.where((pn > 0) & (dn > 0), trust, torch.ones_like(pn))
                buf = self.state[p].setdefault('mu', torch.zeros_like(p))
                p.add_(buf.mul_(g['momentum']).add_(d), alpha=-g['lr'])


class Probe(nn.Module):
    """Frozen backbone + trainable heads. mae: BatchNorm (no affine) + Linear on one feature.
    beit (official BEiT v1 linear eval): a Linear on [CLS; mean patch] of every block."""
    cfg = None  # no config of its own to save

    def __init__(self, backbone, settings, num_classes):
        super().__init__()
        self.backbone, self.settings = backbone.requires_grad_(False), settings
        if isinstance(backbone, Pixels):
            D, L = 3 * settings.img_size ** 2, 1
        else:
            D, L = backbone.cfg.embed_dim, backbone.cfg.depth
        if settings.linear_recipe == 'beit' and L > 1:
            self.heads = nn.ModuleList(nn.Linear(2 * D, num_classes) for _ in range(L))
        else:
            self.heads = nn.ModuleList([nn.Sequential(nn.BatchNorm1d(D, affine=False),
                                                      nn.Linear(D, num_classes))])
        for m in self.heads.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)

    def forward(self, images):  # -> a list of logits, one per head
        self.backbone.eval()
        with torch.no_grad():
            if len(self.heads) > 1:
                _, xs = self.backbone.forward_tokens(images, layers=range(self.backbone.cfg.depth))
                feats = [torch.cat([x[:, 0], x[:, 1:].mean(1)], 1) for x in xs]
            else:
                feats = [pooled(self.backbone, images, self.settings)]
        with torch.autocast(images.device.type, enabled=False):  # the heads train in fp32 (MAE)
            return [h(f.float()) for h, f in zip(self.heads, feats)]


def run_linear(cfg, env):
    backbone = feature_backbone(cfg)
    train_set = data.build_dataset(cfg.data, 'train', cfg.img_size)
    val = data.build_dataset(cfg.data, 'val', cfg.img_size)
    model = Probe(backbone, cfg, len(train_set.classes)).to(env.device)
    groups = [dict(params=list(model.heads.parameters()), weight_decay=cfg.weight_decay,
                   lr_scale=1.0)]
    if cfg.linear_recipe == 'beit':
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, fused=True)
    else:
        optimizer = LARS(groups, lr=cfg.lr)
    bilinear = cfg.linear_recipe == 'beit'  # BEiT v1's probe crops bilinear; MAE's bicubic
    crops = data.TrainTransform(cfg.img_size, cfg.min_crop_scale, bilinear)

    def loss(model, x, y):
        return sum(F.cross_entropy(logits, y) for logits in model(x))
    return train(cfg, env, model, optimizer, train_set, crops, loss, val, classify)

# ------------------------------------------------------------------------ k-NN


def knn_classify(train_f, train_y, test_f, k=20, t=0.07):
    """Weighted k-NN (DINO): cosine similarity, the top-k neighbours vote with exp(sim / t)."""
    num_classes = int(train_y.max()) + 1
    train_f, test_f = F.normalize(train_f, dim=1), F.normalize(test_f, dim=1)
    scores = []
    for q in test_f.split(256):  # 256 queries at a time
        sim, nn_idx = (q @ train_f.t()).topk(min(k, len(train_f)), dim=1)
        weights = ((sim - sim[:, :1]) / t).exp()  # each query's scale: no overflow
        scores.append(torch.zeros(len(q), num_classes, device=q.device)
                      .scatter_add_(1, train_y[nn_idx], weights))
    return torch.cat(scores)


def run_knn(cfg, env):
    backbone = feature_backbone(cfg).to(env.device).eval()
    feats = []
    for split in ('train', 'val'):
        images = data.Mapped(data.build_dataset(cfg.data, split, cfg.img_size),
                             data.eval_transform(cfg.img_size))
        feats.append(engine.gather(lambda x: pooled(backbone, x, cfg), images, cfg, env,
                                   f'k-NN {split}'))
    (train_f, train_y), (val_f, val_y) = feats
    return topk_acc(knn_classify(train_f, train_y, val_f, cfg.knn_k, cfg.knn_t), val_y)

# ---------------------------------------------------- compare: the quick start


def run_compare(cfg, env):
    """Does pretraining help? Linear probe and k-NN top-1 of the checkpoint, of the same
    architecture at its random init, and of raw pixels, each probe with --seeds seeds (k-NN is
    deterministic but for the random init). Each probe trains afresh in a folder of its own under
    OUT_DIR."""
    names = dict(checkpoint='pretrained', random='random init', pixels='raw pixels')
    classes = len(data.build_dataset(cfg.data, 'val', cfg.img_size).classes)
    if 'random' in cfg.backbones:  # checked before the first probe runs
        random_arch(cfg)
    env.print(f'compare on {cfg.data} at {cfg.img_size} px: '
              f'{", ".join(names[b] for b in cfg.backbones)}, each by a linear probe '
              f'({cfg.steps} steps) and k-NN (k={cfg.knn_k}), {cfg.seeds} seed(s) from {cfg.seed}')
    table = {}
    for backbone in cfg.backbones:
        name = names[backbone]
        for seed in range(cfg.seed, cfg.seed + cfg.seeds):
            folder = os.path.join(cfg.out_dir, f'{backbone}_{seed}')
            shutil.rmtree(folder, ignore_errors=True)  # a probe starts afresh
            os.makedirs(folder)
            probe = replace(cfg, backbone=backbone, seed=seed, out_dir=folder, resume='',
                            log_every=cfg.steps, ckpt_every=cfg.steps)
            torch.manual_seed(seed + env.rank)  # each probe as if it ran alone
            runs = [('linear probe', run_linear(probe, env)['top1'])]
            if seed == cfg.seed or backbone == 'random':
                runs.append(('k-NN', run_knn(probe, env)['top1']))
            for what, top1 in runs:
                table.setdefault(what, {}).setdefault(name, []).append(top1)
                env.print(f'  {what:12s} {name:11s} seed {seed}: top-1 {top1:.1f}')
                record(cfg, env, dict(mode='compare_run', checkpoint=cfg.checkpoint, backbone=name,
                                      probe=what, seed=seed, top1=top1, chance=100 / classes))
    means = {what: {name: sum(v) / len(v) for name, v in row.items()}
             for what, row in table.items()}
    line = '; '.join(f'{what}: ' + ' | '.join(f'{name} {m:.1f}' for name, m in row.items())
                     for what, row in means.items())
    env.print(f'top-1 % (chance {100 / classes:.1f}), mean of {cfg.seeds} seed(s): {line}')
    return {f'{what} {name}': m for what, row in means.items() for name, m in row.items()}

# ----------------------------------------------------------------- fine-tuning


def head_size(path):  # the classes of a file's classification head; 0 without one
    return len(beitv2.state_dict_of(engine.read_checkpoint(path)).get('head.weight', ()))


def run_finetune(cfg, env):
    if cfg.robust_test:
        return robust_test(cfg, env)
    if cfg.eval_only and not cfg.validate:
        die('--eval_only scores the val split: drop --validate=False')
    train_set = data.build_dataset(cfg.data, 'train', cfg.img_size)
    classes = len(train_set.classes)
    val = data.build_dataset(cfg.data, 'val', cfg.img_size) if cfg.validate else None
    if cfg.eval_only and head_size(cfg.checkpoint) != classes:
        die(f'--eval_only: {cfg.checkpoint} has no {classes}-class head (the data has {classes} '
            'classes)')
    model = load_backbone(cfg, num_classes=classes, drop_path=cfg.drop_path).to(env.device)
    if cfg.eval_only:
        return classify(model, val, cfg, env)
    optimizer = engine.adamw(model, cfg, cfg.lr, layer_decay=cfg.layer_decay, depth=model.cfg.depth)
    mixes = [kind(alpha=alpha, num_classes=classes)  # the ones switched on
             for kind, alpha in ((T2.MixUp, cfg.mixup), (T2.CutMix, cfg.cutmix)) if alpha > 0]
    mix = T2.RandomChoice(mixes) if mixes else None  # one of the two per batch, at random
    crops = data.TrainTransform(cfg.img_size, cfg.min_crop_scale, randaug=cfg.randaug,
                                reprob=cfg.reprob)

    def loss(model, x, y):
        if mix:
            x, soft = mix(x, y)
        else:
            soft = F.one_hot(y, classes).float()
        # label smoothing on the mixed targets, as timm's Mixup
        return F.cross_entropy(model(x).float(), soft, label_smoothing=cfg.smoothing)
    return train(cfg, env, model, optimizer, train_set, crops, loss, val, classify)


# robustness (paper Table 2, official --robust_test): ImageNet-A and ImageNet-R hold 200 of the 1000
# ImageNet classes; a 1000-class model is scored with its logits restricted to those, in ImageNet
# order, which is also the sorted order of the sets' class folders. The official
# imagenet_a_r_indices.py gives them as masks over the sorted 1000 wnids; here each mask is a
# 1000-bit hex number, bit i from the left for class i.
def class_mask(hexdigits):  # -> the ImageNet-1k indices of the classes in the mask
    bits = f'{int(hexdigits, 16):01000b}'
    return tuple(i for i, bit in enumerate(bits) if bit == '1')


IMAGENET_A = class_mask('021543120521204003090062d05a400c280183000000000000010000003000020000041111'
                        '243f751b238010005008202004e910c84a060400c60280128880002800a0130484604d10'
                        '04000342003000f0002008042900048001000080248214869820843805090151052012'
                        '020180a0481040080e41512d00180cb800')
IMAGENET_R = class_mask('6ad403250101000101090822d85040242800db10f01820101111801001b0253219540c40'
                        'dc940f3111236c90506788000a444106004a144180430788110000001000000020120020'
                        '11106800444404040000600000000004000408000000001082981000040908804001080020'
                        '101041001000009ec15d6415000d0800')


def robust_test(cfg, env):
    """Top-1/5 of a fine-tuned 1000-class checkpoint on --data, an ImageNet-A or -R folder
    (ROOT/CLASS/image, its 200 class folders), with the logits restricted to that set's classes."""
    classes = dict(imagenet_a=IMAGENET_A, imagenet_r=IMAGENET_R)[cfg.robust_test]
    if not cfg.eval_only:
        die('--robust_test scores a fine-tuned model: pass --eval_only=True')
    if head_size(cfg.checkpoint) != 1000:
        die(f'--robust_test: {cfg.checkpoint} has no 1000-class (ImageNet) head')
    model = load_backbone(cfg, num_classes=1000).to(env.device)
    try:
        val = torchvision.datasets.ImageFolder(cfg.data, loader=data.load_image)
    except (FileNotFoundError, OSError) as e:
        die(f'--robust_test: {cfg.data}: {e}')
    if len(val.classes) != len(classes):
        die(f'--robust_test: {cfg.data} has {len(val.classes)} class folders, {cfg.robust_test} '
            f'has {len(classes)} (expected ROOT/CLASS/image)')
    return classify(model, val, cfg, env, restrict=torch.tensor(classes))

# ---------------------------------------------------------------- segmentation


@torch.no_grad()
def segment_score(model, val, cfg, env):
    """mIoU on the val split as mmseg scores it: the image resized to fit (4S, S), sliding windows
    of the crop size S, the logits resized (bilinear) back to the original mask's size."""
    model.eval()
    t = data.SegTransform(cfg.img_size, False)
    conf = torch.zeros(val.num_classes, val.num_classes, dtype=torch.long, device=env.device)
    mine = range(env.rank, len(val), env.world)
    tick = engine.progress(env, '  scoring the val split, images', len(mine))
    stride = cfg.seg_stride or cfg.img_size * 2 // 3
    for n in range(0, len(mine), cfg.batch_size):  # the windows of batch_size images at a time
        pairs = [t(val[i], None) for i in mine[n:n + cfg.batch_size]]
        images = [img.to(env.device) for img, _ in pairs]
        with env.autocast():
            all_logits = upernet.sliding_window(model, images, val.num_classes, cfg.img_size,
                                                stride, cfg.batch_size)
        for logits, (_, mask) in zip(all_logits, pairs):
            logits = F.interpolate(logits[None], size=mask.shape, mode='bilinear')
            conf += upernet.confusion(logits[0].argmax(0), mask.to(env.device), val.num_classes)
        tick(n + len(pairs))
    return upernet.seg_scores(env.all_reduce(conf))


def run_segment(cfg, env):
    if cfg.eval_only:  # a trained segmenter: ours or a released mmseg UperNet file
        return segment_eval_only(cfg, env)
    train_set = data.SegData(cfg.data, 'train', cfg.img_size)
    val = data.SegData(cfg.data, 'val', cfg.img_size)
    backbone = load_backbone(cfg, rel_pos='per_block', fc_norm=True, drop_path=cfg.drop_path)
    check_seg_layers(cfg, backbone.cfg.depth)
    model = upernet.Segmenter(backbone, cfg.seg_layers, train_set.num_classes).to(env.device)
    if env.ddp and env.device.type == 'cuda':
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # the official mmseg run: 'backbone.cls_token' misses its no-decay name test, so it IS decayed
    optimizer = engine.adamw(model, cfg, cfg.lr, layer_decay=cfg.layer_decay,
                             depth=backbone.cfg.depth, no_decay=())

    def loss(model, x, y):
        logits, aux = model(x)
        # the auxiliary FCN head's loss, weight 0.4 (official)
        return upernet.seg_loss(logits, y) + 0.4 * upernet.seg_loss(aux, y)
    return train(cfg, env, model, optimizer, train_set, data.SegTransform(cfg.img_size, True),
                 loss, val, segment_score)


def check_seg_layers(cfg, depth):
    if not all(0 <= i < depth for i in cfg.seg_layers):
        die(f'--seg_layers needs 4 block indices below {depth}, got {cfg.seg_layers}')


def segment_eval_only(cfg, env):
    """Scores of a segmentation checkpoint on the val split."""
    model = trained_segmenter(cfg, engine.read_checkpoint(cfg.checkpoint))
    val = data.SegData(cfg.data, 'val', cfg.img_size)
    classes = model.decode_head.conv_seg.out_channels
    if classes != val.num_classes:
        die(f'{cfg.checkpoint} segments {classes} classes, {cfg.data} has {val.num_classes}')
    return segment_score(model.to(env.device), val, cfg, env)


def trained_segmenter(cfg, ckpt):
    """Our Segmenter holding a trained one's weights, ours or a released mmseg UperNet's (the
    backbone's state dict, the heads' in mmseg's names), strictly; its blocks are those up to the
    last one read."""
    sd = beitv2.state_dict_of(ckpt)
    if 'decode_head.conv_seg.weight' not in sd:
        die(f'{cfg.checkpoint}: not a segmentation checkpoint (no decode_head.*): train one with '
            '--mode=segment')
    vit, heads = upernet.split_mmseg(sd)
    classes, channels = heads['decode_head.conv_seg.weight'].shape[:2]
    backbone = engine.read_backbone(cfg.checkpoint,
                                    dict(model=vit, model_config=ckpt.get('model_config')),
                                    img_size=cfg.img_size,
                                    rel_pos='per_block', fc_norm=True,
                                    depth=beitv2.count_blocks(vit))
    check_seg_layers(cfg, backbone.cfg.depth)
    model = upernet.Segmenter(backbone, cfg.seg_layers, classes, channels)
    missing, unexpected = model.load_state_dict(heads, strict=False)
    missing = [k for k in missing if not k.startswith('backbone.')]  # loaded above
    if missing or unexpected:
        die(f'{cfg.checkpoint}: segmentation heads do not match (missing {missing[:3]}, '
            f'unexpected {unexpected[:3]}; --seg_layers={cfg.seg_layers})')
    return model


@settings.one_line_errors
def main(argv=None):
    cfg = settings.configure(Config(), PRESETS, argv)
    if not cfg.checkpoint:
        die('--checkpoint is required for this preset')
    if cfg.schedule == 'cosine_epoch' and not cfg.epochs:
        die('--schedule=cosine_epoch steps once per epoch: give --epochs')
    if cfg.img_size is None:  # the size the checkpoint was trained at
        cfg.img_size = trained_img_size(cfg.checkpoint)
    if not cfg.out_dir:
        suffix = '' if cfg.backbone == 'checkpoint' else '_' + cfg.backbone
        cfg.out_dir = os.path.join('out', 'eval', cfg.mode + suffix)
    env = engine.Env(cfg.device, cfg.dtype, cfg.seed, cfg.out_dir, cfg.compile)
    modes = dict(linear=run_linear, knn=run_knn, compare=run_compare, finetune=run_finetune,
                 segment=run_segment)
    result = modes[cfg.mode](cfg, env)
    if cfg.mode != 'compare':  # compare printed its own table
        shown = [f'{k} {v:.2f}' if isinstance(v, float) else f'{k} {v}' for k, v in result.items()]
        env.print(f'{cfg.mode}: ' + ', '.join(shown))
    record(cfg, env, dict(mode=cfg.mode, checkpoint=cfg.checkpoint, backbone=cfg.backbone,
                          **result))
    env.close()
    return result


def trained_img_size(path):
    """The input size a backbone file was trained at: ours save it; others say it by their
    shapes."""
    try:
        return beitv2.backbone_config(engine.read_checkpoint(path)).img_size
    except (ValueError, KeyError):
        die(f'{path} does not say its input size: give --img_size')


if __name__ == '__main__':
    main()
