"""Stage 3: evaluate a pretrained backbone (ours or an official file) by linear probing, k-NN,
fine-tuning (with the ImageNet-A/R robustness test) or semantic segmentation. The modes, in the
order this file holds them (pictures.py looks inside a backbone or a tokenizer):

    python evaluate.py --mode=linear | knn          # one probe on the --backbone
    python evaluate.py                              # compare (demo): both probes, pretrained vs random init vs pixels
    python evaluate.py --mode=finetune | segment
    torchrun --nproc_per_node=8 evaluate.py --preset=finetune_base --data=/data/imagenet \\
        --checkpoint=beitv2_base_patch16_224_pt1k.pth
Settings are --key=value (`--help` lists them, each mode's after the shared ones); README.md has the recipes.
"""
import contextlib
import json
import math
import os
from dataclasses import asdict, dataclass, replace
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')  # before torch loads OpenMP: idle threads sleep (a busy machine)

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
import torchvision.transforms.v2 as T2

import beitv2
import common
import data
import upernet

@dataclass
class Config(common.Run):
    mode: str = common.one_of('compare', 'linear', 'knn', 'finetune', 'segment')  # compare: both probes, 3 backbones
    checkpoint: str = 'out/pretrain/ckpt.pt'  # ours or official (pretraining / fine-tuned / tokenizer)
    img_size: int = common.at_least(1, 32)  # input size; not given: what --checkpoint (ours) was trained at, or 32
    min_crop_scale: float = common.above(0, 0.5)  # RandomResizedCrop scale range for linear / fine-tune training
    backbone: str = common.one_of('checkpoint', 'random', 'pixels')  # random: its architecture at the official init
    #                                 (what pretraining started from) | pixels: raw pixels, no network
    feature: str = common.one_of('cls', 'mean')  # probes: [CLS] after the final norm (paper) | the mean patch token
    layer: int = -1                 # block whose tokens are used (checked against the depth); -1 = last
    linear_recipe: str = common.one_of('mae', 'beit')  # mae: BatchNorm + linear, LARS | beit: AdamW, a head per block
    knn_k: int = common.at_least(1, 20)  # neighbours that vote
    knn_t: float = common.above(0, 0.07)  # temperature of the neighbours' votes
    backbones: tuple = common.rule(('checkpoint', 'random', 'pixels'), 'some of checkpoint, random, pixels: compare '
                                   'sets them side by side', lambda v: v and {*v} <= {'checkpoint', 'random', 'pixels'})
    seeds: int = common.at_least(1, 1)   # compare: probes with seeds seed, seed+1, ... (mean reported)
    # fine-tuning
    layer_decay: float = common.within(0.65, 0, 1)  # block i (from 0) trains at lr * layer_decay ** (depth - i)
    drop_path: float = common.within(0.1, 0, 1, ')')  # stochastic depth rate of the last block (linear in depth)
    mixup: float = common.at_least(0, 0.8)  # fine-tuning: Beta(a, a) mixing of image pairs; 0 = off
    cutmix: float = common.at_least(0, 1.0)  # fine-tuning: Beta(a, a) box pasting; 0 = off
    smoothing: float = common.within(0.1, 0, 1, ')')  # fine-tuning: label smoothing
    reprob: float = common.within(0.25, 0, 1)  # fine-tuning: random erasing probability
    randaug: bool = True            # fine-tuning: timm's RandAugment rand-m9-mstd0.5-inc1 (official --aa)
    eval_only: bool = False         # score --checkpoint on the val split, no training
    validate: bool = True           # False: no val split, train only (the 21k presets; official
    #                                 --disable_eval_during_finetuning)
    robust_test: str = common.one_of('', 'imagenet_a', 'imagenet_r')  # finetune --eval_only; --data = that set
    eval_every: int = common.at_least(-1, -1)  # training modes: score val every N steps too (log: val_*;
    #                                 result: final and best_*); -1 = each epoch of --epochs recipes, else 0: the end
    # segmentation
    seg_layers: tuple = common.rule((1, 2, 3, 5), '4 block indices, feeding the 4 scales (official base: 3, 5, 7, 11)',
                                    lambda v: len(v) == 4 and all(type(i) is int and i >= 0 for i in v))
    seg_stride: int = common.at_least(0, 0)  # sliding-window stride at test time; 0 = 2/3 of img_size
    steps: int = common.at_least(1, 300)  # optimizer steps in all (a resumed run counts the ones done)
    warmup_steps: int = common.at_least(0, 30)  # linear warmup of the lr from 0
    lr: float = common.above(0, 4.0)  # peak lr, absolute; the demo's LARS needs more than MAE's 0.1 x batch / 256
    min_lr: float = common.at_least(0, 0.0)  # the lr at the last step
    weight_decay: float = common.at_least(0, 0.0)  # the optimizer's
    out_dir: str = ''               # '' = out/eval/MODE (out/eval/MODE_BACKBONE for random / pixels)

IN1K = dict(data='', checkpoint='', img_size=224, min_crop_scale=0.08, workers=10, log_every=100, ckpt_every=5000)
FT = dict(IN1K, mode='finetune', min_lr=1e-6, weight_decay=0.05, recipe_batch=1024)
SEG = dict(IN1K, mode='segment', img_size=512, batch_size=2, recipe_batch=16, steps=160000, warmup_steps=1500,
           weight_decay=0.05, seg_stride=341, schedule='poly', eval_every=16000)  # schedule_160k: scored every 16k
PRESETS = {
    'demo': {},
    'demo_finetune': dict(mode='finetune', lr=1e-3, weight_decay=0.05, steps=300, warmup_steps=30),
    'demo_segment': dict(mode='segment', lr=1e-3, weight_decay=0.05, layer_decay=0.9, steps=300, schedule='poly'),
    # Fashion-MNIST (--data=fashion_mnist:ROOT), docs/results.md: ~1 epoch, light augmentation, scored every 200 steps
    'fmnist_finetune': dict(mode='finetune', lr=1e-3, weight_decay=0.05, steps=1000, warmup_steps=100, layer_decay=0.75,
                            mixup=0.0, cutmix=0.0, randaug=False, reprob=0.0, min_crop_scale=0.8, eval_every=200),
    # MAE linear protocol: batch 16384 with LARS, lr 0.1 x batch / 256, 90 epochs, 10 warmup
    'linear_base': dict(IN1K, mode='linear', batch_size=1024, accum=2, recipe_batch=16384, epochs=90, warmup_epochs=10,
                        lr=6.4),
    'linear_beit': dict(IN1K, mode='linear', linear_recipe='beit', batch_size=128, epochs=100, lr=4e-3,
                        weight_decay=1e-4, schedule='cosine_epoch'),  # official BEiT v1 run_linear_eval.py
    'knn_base': dict(IN1K, mode='knn', batch_size=256),
    # fine-tuning, official get_started_for_image_classification.md (8 GPUs; batch = GPUs x batch x accum)
    # base from the pretrained model: 8 x 128, lr 5e-4, 100 epochs, layer decay 0.6 (1600 ep) / 0.65 (300 ep)
    'finetune_base': dict(FT, batch_size=128, epochs=100, warmup_epochs=20, lr=5e-4, layer_decay=0.6, drop_path=0.2),
    'finetune_base_300': dict(FT, batch_size=128, epochs=100, warmup_epochs=20, lr=5e-4, layer_decay=0.65,
                              drop_path=0.1),
    # large from the pretrained model: 8 x 64 x update_freq 2, lr 2e-4 (1600 ep) / 5e-4 (300 ep), 50 epochs,
    # 5 warmup, layer decay 0.8, drop path 0.2
    'finetune_large': dict(FT, batch_size=64, accum=2, epochs=50, warmup_epochs=5, lr=2e-4, layer_decay=0.8,
                           drop_path=0.2),
    'finetune_large_300': dict(FT, batch_size=64, accum=2, epochs=50, warmup_epochs=5, lr=5e-4, layer_decay=0.8,
                               drop_path=0.2),
    # intermediate fine-tuning on ImageNet-21k (21841 classes): 32 GPUs x 128 = 4096 (8 GPUs: accum 4), lr 6e-4,
    # 90 epochs, 20 warmup, layer decay 0.75, drop path 0.1 base / 0.2 large; 21k has no val split
    'finetune_21k_base': dict(FT, batch_size=128, accum=4, recipe_batch=4096, epochs=90, warmup_epochs=20, lr=6e-4,
                              layer_decay=0.75, drop_path=0.1, validate=False),
    'finetune_21k_large': dict(FT, batch_size=128, accum=4, recipe_batch=4096, epochs=90, warmup_epochs=20, lr=6e-4,
                               layer_decay=0.75, drop_path=0.2, validate=False),
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


def vit_config_from_state(sd):
    """ViTConfig for an official / timm / our state dict, read off its shapes (64-dim heads)."""
    w = sd['patch_embed.proj.weight']
    D, p = w.shape[0], w.shape[-1]
    depth = len({k.split('.')[1] for k in sd if k.startswith('blocks.')})
    table = sd.get('rel_pos_bias.relative_position_bias_table', sd.get('blocks.0.attn.relative_position_bias_table'))
    grid = (int(math.sqrt(table.shape[0] - 3)) + 1) // 2 if table is not None else None
    return beitv2.ViTConfig(
        img_size=grid * p if grid else 224, patch_size=p, embed_dim=D, depth=depth, num_heads=D // 64,
        layer_scale=0.1 if 'blocks.0.gamma_1' in sd else 0.0, abs_pos_emb='pos_embed' in sd,
        rel_pos='shared' if 'rel_pos_bias.relative_position_bias_table' in sd else 'per_block' if table is not None
        else 'none', fc_norm='norm.weight' not in sd, num_classes=len(sd['head.weight']) if 'head.weight' in sd else 0)


def load_weights(path, segmenter=False):
    """-> (state dict, our ViT/BEiT config or None) of a checkpoint; tokenizers are refused.
    segmenter: a segmentation file (ours or a released mmseg UperNet): -> (the ViT's, the heads', config)."""
    ckpt = common.read_checkpoint(path)
    try:
        sd = beitv2.state_dict_of(ckpt)
    except ValueError as e:
        common.die(f'{path}: {e}')
    if any(k.startswith(('encoder.', 'quantize.')) for k in sd):
        common.die(f'{path} is a tokenizer; this mode needs a pretraining or fine-tuned backbone')
    if segmenter:
        if 'decode_head.conv_seg.weight' not in sd:
            common.die(f'{path}: not a segmentation checkpoint (no decode_head.*): train one with --mode=segment')
        sd, heads = upernet.split_mmseg(sd)
    mcfg = ckpt.get('model_config') if isinstance(ckpt.get('model_config'), dict) else None  # ours only
    if 'patch_embed.proj.weight' not in sd:
        common.die(f'{path}: no ViT weights in it')
    return (sd, heads, mcfg) if segmenter else (sd, mcfg)


def trained_img_size(path):
    """The input size in the saved config of one of our checkpoints (read by mmap, not loaded); else None."""
    with contextlib.suppress(Exception):
        return beitv2.load_file(path, mmap=True)['model_config']['img_size']


def load_backbone_weights(cfg):
    sd, mcfg = load_weights(cfg.checkpoint)
    if cfg.backbone == 'random':  # what pretraining started from: the official init of the same model
        if not mcfg or 'vocab_size' not in mcfg:
            common.die('--backbone=random needs one of our pretraining checkpoints (it reads the architecture)')
        torch.manual_seed(cfg.seed)
        sd = beitv2.BEiTv2(beitv2.BEiTConfig(**mcfg)).state_dict()
    return sd, mcfg


Pixels = nn.Flatten  # the raw-pixel baseline: the (normalised) image itself as the feature vector


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
        return Pixels()
    sd, mcfg = load_backbone_weights(cfg)
    return build_backbone(cfg, sd, mcfg, num_classes=0, drop_path=0.0)


def pooled(backbone, images, cfg):
    """[CLS] or mean patch token of block `cfg.layer` (after the final norm for the last block)."""
    if isinstance(backbone, Pixels):
        return backbone(images)
    layer = common.block_index(cfg.layer, backbone.cfg.depth)
    x = backbone.forward_tokens(images, layers=(layer,))[1][0]
    f = x[:, 0] if cfg.feature == 'cls' else x[:, 1:].mean(1)
    if layer == backbone.cfg.depth - 1:
        f = (backbone.norm or backbone.fc_norm)(f)
    return f

# ----------------------------------------------------------- shared by the modes: data, features, training loop, scores


class TrainTransform:
    """Linear probe: RandomResizedCrop + flip (MAE: bicubic; BEiT v1's linear recipe: bilinear). Fine-tuning adds
    RandAugment (timm's rand-m9-mstd0.5-inc1, as the official run) and random erasing (reprob 0.25, pixel mode)."""

    def __init__(self, cfg, finetune):
        bilinear = not finetune and cfg.linear_recipe == 'beit'
        mode = T.InterpolationMode.BILINEAR if bilinear else T.InterpolationMode.BICUBIC
        self.crop = T.Compose([T.RandomResizedCrop(cfg.img_size, scale=(cfg.min_crop_scale, 1.0), interpolation=mode),
                               T.RandomHorizontalFlip()])
        self.randaug = data.RandAugment() if finetune and cfg.randaug else None
        after = [T.ToTensor(), T.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD)]
        if finetune and cfg.reprob > 0:
            # timm's constants: area 2% to 1/3, aspect ratio 0.3 to 1/0.3, per-pixel normal values
            after.append(T.RandomErasing(cfg.reprob, scale=(0.02, 1 / 3), ratio=(0.3, 1 / 0.3), value='random'))
        self.after = T.Compose(after)

    def __call__(self, img, rng):
        img = self.crop(img)
        return self.after(img if self.randaug is None else self.randaug(img, rng))


@torch.no_grad()
def extract(fn, dataset, cfg, env, what):
    """fn(images) -> (B, C) for every image of `dataset` (no augmentation), gathered on all ranks."""
    shard = torch.utils.data.Subset(dataset, range(env.rank, len(dataset), env.world))
    feats, labels = [], []
    loader = torch.utils.data.DataLoader(shard, cfg.batch_size, num_workers=cfg.workers)
    tick = common.progress(env, f'  {what}, batches', len(loader))
    for i, (x, y) in enumerate(loader, 1):
        with env.autocast():
            feats.append(fn(x.to(env.device)).float())
        labels.append(y.to(env.device))
        tick(i)
    shape = feats[0].shape[1:]
    f = torch.cat([torch.cat(feats).flatten(1), torch.cat(labels)[:, None].float()], 1)  # labels: a last column
    if env.ddp:  # pad to equal length, gather, drop the padding, restore the dataset order
        n = math.ceil(len(dataset) / env.world)
        parts = [torch.empty(n, f.shape[1], device=f.device) for _ in range(env.world)]
        dist.all_gather(parts, torch.cat([f, f.new_zeros(n - len(f), f.shape[1])]))
        f = torch.stack(parts, 1).flatten(0, 1)[:len(dataset)]  # rank r held items r, r + world, ...
    return f[:, :-1].view(-1, *shape), f[:, -1].long()


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
        return out if restrict is None else out[..., restrict.to(out.device)]
    scores, y = extract(fn, data.Mapped(val, data.eval_transform(cfg.img_size)), cfg, env, 'scoring the val split')
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
        pixels = isinstance(backbone, Pixels)
        D, L = (3 * cfg.img_size ** 2, 1) if pixels else (backbone.cfg.embed_dim, backbone.cfg.depth)
        if cfg.linear_recipe == 'beit' and not pixels:
            self.heads = nn.ModuleList(nn.Linear(2 * D, num_classes) for _ in range(L))
        else:
            self.heads = nn.ModuleList([nn.Sequential(nn.BatchNorm1d(D, affine=False), nn.Linear(D, num_classes))])
        for m in self.heads.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)

    def forward(self, images):  # -> list of logits, one per head
        self.backbone.eval()
        with torch.no_grad():
            if len(self.heads) > 1:
                _, xs = self.backbone.forward_tokens(images, layers=range(self.backbone.cfg.depth))
                feats = [torch.cat([x[:, 0], x[:, 1:].mean(1)], 1) for x in xs]
            else:
                feats = [pooled(self.backbone, images, self.cfg)]
        with torch.autocast(images.device.type, enabled=False):  # the heads train in fp32 (BEiT v1, MAE)
            return [h(f.float()) for h, f in zip(self.heads, feats)]


def run_linear(cfg, env, quiet=False):
    backbone = feature_backbone(cfg)
    train, val = (data.build_dataset(cfg.data, split, cfg.img_size) for split in ('train', 'val'))
    model = Probe(backbone, cfg, len(train.classes)).to(env.device)
    heads = [p for p in model.heads.parameters()]
    if cfg.linear_recipe == 'beit':
        optimizer = torch.optim.AdamW([dict(params=heads, weight_decay=cfg.weight_decay)], lr=cfg.lr, fused=True)
    else:
        optimizer = LARS([dict(params=heads, weight_decay=cfg.weight_decay)], lr=cfg.lr)

    def step(run, batch):
        x, y = batch[0].to(env.device), batch[1].to(env.device)
        return sum(F.cross_entropy(lg, y) for lg in run(x)), {}
    return common.fit(cfg, env, model, optimizer, train, TrainTransform(cfg, False), step,
                      lambda m: classify(m, val, cfg, env), 'top1', inputs=('checkpoint',), quiet=quiet)

# ----------------------------------------------------------------------------- k-NN


def knn_classify(train_f, train_y, test_f, k=20, t=0.07, num_classes=None, chunk=256):
    """Weighted k-NN (DINO): cosine similarity, top-k neighbours vote with exp(sim / t) (each query's scale)."""
    num_classes = num_classes or int(train_y.max()) + 1
    train_f, test_f = F.normalize(train_f, dim=1), F.normalize(test_f, dim=1)
    scores = []
    for q in test_f.split(chunk):
        sim, nn_idx = (q @ train_f.t()).topk(min(k, len(train_f)), dim=1)
        votes = torch.zeros(len(q), num_classes, device=q.device)
        scores.append(votes.scatter_add_(1, train_y[nn_idx], ((sim - sim[:, :1]) / t).exp()))  # no overflow
    return torch.cat(scores)


def run_knn(cfg, env):
    backbone = feature_backbone(cfg).to(env.device).eval()
    (train_f, train_y), (val_f, val_y) = [extract(lambda x: pooled(backbone, x, cfg), data.Mapped(data.build_dataset(
        cfg.data, split, cfg.img_size), data.eval_transform(cfg.img_size)), cfg, env, f'k-NN {split}')
        for split in ('train', 'val')]
    return topk_acc(knn_classify(train_f, train_y, val_f, cfg.knn_k, cfg.knn_t), val_y)

# ------------------------------------------------------------- compare: both probes on every backbone (the quick start)


def run_compare(cfg, env):
    """Does pretraining help? Linear probe and k-NN top-1 of the checkpoint, of the same
    architecture at its random init, and of raw pixels, each probe with --seeds seeds (k-NN is
    deterministic except for the random init). The probes start afresh every time."""
    names = dict(checkpoint='pretrained', random='random init', pixels='raw pixels')
    classes = len(data.build_dataset(cfg.data, 'val', cfg.img_size).classes)
    table = {}
    if 'random' in cfg.backbones:  # its check (one of our pretraining files) before the first probe runs
        load_backbone_weights(replace(cfg, backbone='random'))
    env.print(f'compare on {cfg.data} at {cfg.img_size} px: {", ".join(names[b] for b in cfg.backbones)}, each by a '
              f'linear probe ({cfg.steps} steps) and k-NN (k={cfg.knn_k}), {cfg.seeds} seed(s) from {cfg.seed}')
    for backbone in cfg.backbones:
        name = names[backbone]
        for seed in range(cfg.seed, cfg.seed + cfg.seeds):
            sub = replace(cfg, backbone=backbone, seed=seed, out_dir=os.path.join(cfg.out_dir, f'{backbone}_{seed}'))
            os.makedirs(sub.out_dir, exist_ok=True)  # a probe starts afresh (fit's quiet mode resumes nothing)
            torch.manual_seed(seed + env.rank)  # each probe as if run alone: 1 seed or 3, the same numbers
            runs = [('linear probe', run_linear(sub, env, quiet=f'{name} linear probe')['top1'])]
            if seed == cfg.seed or backbone == 'random':
                runs.append(('k-NN', run_knn(sub, env)['top1']))
            for probe, top1 in runs:
                table.setdefault(probe, {}).setdefault(name, []).append(top1)
                env.print(f'  {probe:12s} {name:11s} seed {seed}: top-1 {top1:.1f}')
                record(cfg, env, dict(mode='compare_run', checkpoint=cfg.checkpoint, backbone=name, probe=probe,
                                      seed=seed, top1=top1, chance=100 / classes))
    mean = {p: {n: sum(v) / len(v) for n, v in row.items()} for p, row in table.items()}
    line = '; '.join(f'{p}: ' + ' | '.join(f'{n} {v:.1f}' for n, v in row.items()) for p, row in mean.items())
    env.print(f'top-1 % (chance {100 / classes:.1f}), mean of {cfg.seeds} seed(s): {line}')
    return {f'{p} {n}': v for p, row in mean.items() for n, v in row.items()}

# ----------------------------------------------------------------------------- fine-tuning


def run_finetune(cfg, env):
    sd, mcfg = load_backbone_weights(cfg)
    if cfg.robust_test:
        return robust_test(cfg, env, sd, mcfg)
    train = data.build_dataset(cfg.data, 'train', cfg.img_size)
    classes = len(train.classes)
    if cfg.eval_only and not cfg.validate:
        common.die('--eval_only scores the val split: drop --validate=False')
    val = data.build_dataset(cfg.data, 'val', cfg.img_size) if cfg.validate else None
    if cfg.eval_only and sd.get('head.weight', torch.empty(0)).shape[:1] != (classes,):
        common.die(f'--eval_only: {cfg.checkpoint} has no {classes}-class head (the data has {classes} classes)')
    model = build_backbone(cfg, sd, mcfg, rel_pos='per_block', fc_norm=True, num_classes=classes,
                           drop_path=cfg.drop_path).to(env.device)
    if cfg.eval_only:
        return classify(model, val, cfg, env)
    groups = common.param_groups(model, cfg.weight_decay, cfg.layer_decay, model.cfg.depth)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=True)
    mixes = [m for a, m in ((cfg.mixup, T2.MixUp(alpha=cfg.mixup or 1.0, num_classes=classes)),
                            (cfg.cutmix, T2.CutMix(alpha=cfg.cutmix or 1.0, num_classes=classes))) if a > 0]
    mix = T2.RandomChoice(mixes) if mixes else None  # switch probability 0.5 between the two

    def step(run, batch):
        x, y = batch[0].to(env.device), batch[1].to(env.device)
        x, soft = mix(x, y) if mix else (x, F.one_hot(y, classes).float())  # MixUp or CutMix per batch
        return F.cross_entropy(run(x).float(), soft, label_smoothing=cfg.smoothing), {}  # smoothing as timm's Mixup
    return common.fit(cfg, env, model, optimizer, train, TrainTransform(cfg, True), step,
                      None if val is None else lambda m: classify(m, val, cfg, env), 'top1', inputs=('checkpoint',),
                      model_config=asdict(model.cfg))


def robust_test(cfg, env, sd, mcfg):
    """Top-1/5 of a fine-tuned 1000-class checkpoint on --data, an ImageNet-A or -R folder
    (ROOT/CLASS/image, its 200 class folders), with the logits restricted to that set's classes."""
    classes = {'imagenet_a': data.IMAGENET_A, 'imagenet_r': data.IMAGENET_R}[cfg.robust_test]
    if not cfg.eval_only:
        common.die('--robust_test scores a fine-tuned model: pass --eval_only=True')
    if sd.get('head.weight', torch.empty(0)).shape[:1] != (1000,):
        common.die(f'--robust_test: {cfg.checkpoint} has no 1000-class (ImageNet) head')
    try:
        val = torchvision.datasets.ImageFolder(cfg.data, loader=data.load_image)
    except (FileNotFoundError, OSError) as e:
        common.die(f'--robust_test: {cfg.data}: {e}')
    if len(val.classes) != len(classes):
        common.die(f'--robust_test: {cfg.data} has {len(val.classes)} class folders, {cfg.robust_test} has '
                   f'{len(classes)} (expected ROOT/CLASS/image)')
    model = build_backbone(cfg, sd, mcfg, rel_pos='per_block', fc_norm=True, num_classes=1000).to(env.device)
    return classify(model, val, cfg, env, restrict=torch.tensor(classes))

# ---------------------------------------------------------- segmentation: UperNet on the ViT (official ADE20K protocol)


@torch.no_grad()
def segment_score(model, val, cfg, env):
    """mIoU on the val split as mmseg scores it: the image resized to fit (4S, S), sliding windows
    of the crop size S, the logits resized (bilinear) back to the original mask's size."""
    model.eval()
    t = data.SegTransform(cfg.img_size, False)
    conf = torch.zeros(val.num_classes, val.num_classes, dtype=torch.long, device=env.device)
    mine = range(env.rank, len(val), env.world)
    tick = common.progress(env, '  scoring the val split, images', len(mine))
    for n in range(0, len(mine), cfg.batch_size):  # the windows of batch_size images at a time
        pairs = [t(val[i], None) for i in mine[n:n + cfg.batch_size]]
        with env.autocast():
            all_logits = upernet.sliding_window(model, [img.to(env.device) for img, _ in pairs], val.num_classes,
                                                cfg.img_size, cfg.seg_stride or cfg.img_size * 2 // 3, cfg.batch_size)
        for logits, (_, mask) in zip(all_logits, pairs):
            logits = F.interpolate(logits[None], size=mask.shape, mode='bilinear', align_corners=False)[0]
            conf += upernet.confusion(logits.argmax(0).flatten(), mask.to(env.device).flatten(), val.num_classes)
        tick(n + len(pairs))
    return upernet.seg_scores(env.all_reduce(conf))


def run_segment(cfg, env):
    if cfg.eval_only:  # a trained segmenter: ours or a released mmseg UperNet file
        return segment_eval_only(cfg, env)
    sd, mcfg = load_backbone_weights(cfg)
    train, val = data.SegData(cfg.data, 'train', cfg.img_size), data.SegData(cfg.data, 'val', cfg.img_size)
    backbone = build_backbone(cfg, sd, mcfg, rel_pos='per_block', fc_norm=True, num_classes=0, drop_path=cfg.drop_path)
    check_seg_layers(cfg, backbone)
    model = upernet.Segmenter(backbone, cfg.seg_layers, train.num_classes).to(env.device)
    if env.ddp and env.device.type == 'cuda':
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # official mmseg run: 'backbone.cls_token' misses its no-decay name test, so it IS decayed
    groups = common.param_groups(model, cfg.weight_decay, cfg.layer_decay, backbone.cfg.depth, no_decay=())
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=True)

    def step(run, batch):
        x, y = batch[0].to(env.device), batch[1].to(env.device)
        logits, aux = run(x)
        return upernet.seg_loss(logits, y) + 0.4 * upernet.seg_loss(aux, y), {}  # auxiliary FCN head, weight 0.4
    return common.fit(cfg, env, model, optimizer, train, data.SegTransform(cfg.img_size, True), step,
                      lambda m: segment_score(m, val, cfg, env), 'mIoU', inputs=('checkpoint',),
                      model_config=asdict(backbone.cfg), joint=True)


def check_seg_layers(cfg, backbone):
    if len(cfg.seg_layers) != 4 or not all(0 <= i < backbone.cfg.depth for i in cfg.seg_layers):
        common.die(f'--seg_layers needs 4 block indices below {backbone.cfg.depth}, got {cfg.seg_layers}')


def segment_eval_only(cfg, env):
    """Scores of a segmentation checkpoint on the val split."""
    sd, heads, mcfg = load_weights(cfg.checkpoint, segmenter=True)
    val = data.SegData(cfg.data, 'val', cfg.img_size)
    classes = heads['decode_head.conv_seg.weight'].shape[0]
    if classes != val.num_classes:
        common.die(f'{cfg.checkpoint} segments {classes} classes, {cfg.data} has {val.num_classes}')
    return segment_score(trained_segmenter(cfg, sd, heads, mcfg).to(env.device), val, cfg, env)


def trained_segmenter(cfg, sd, heads, mcfg):
    """Our Segmenter holding a trained one's weights (the ViT's state dict, the heads' in mmseg names),
    strictly; its blocks are those up to the last one read."""
    classes, channels = heads['decode_head.conv_seg.weight'].shape[:2]
    depth = len({k.split('.')[1] for k in sd if k.startswith('blocks.')})
    backbone = build_backbone(cfg, sd, mcfg, rel_pos='per_block', fc_norm=True, num_classes=0, depth=depth)
    check_seg_layers(cfg, backbone)
    model = upernet.Segmenter(backbone, cfg.seg_layers, classes, channels)
    missing, unexpected = model.load_state_dict(heads, strict=False)
    missing = [k for k in missing if not k.startswith('backbone.')]  # loaded above
    if missing or unexpected:
        common.die(f'{cfg.checkpoint}: segmentation heads do not match (missing {missing[:3]}, '
                   f'unexpected {unexpected[:3]}; --seg_layers={cfg.seg_layers})')
    return model


def main(argv=None):
    cfg = common.configure(Config(), PRESETS, argv)
    modes = dict(linear=run_linear, knn=run_knn, compare=run_compare, finetune=run_finetune, segment=run_segment)
    if not cfg.checkpoint:
        common.die('--checkpoint is required for this preset')
    if not {'img_size'} & (cfg.given | PRESETS[cfg.preset].keys()):  # neither the command line nor the preset
        cfg.img_size = trained_img_size(cfg.checkpoint) or cfg.img_size
    if cfg.schedule == 'cosine_epoch' and not cfg.epochs:
        common.die('--schedule=cosine_epoch steps once per epoch: give --epochs')
    suffix = '' if cfg.backbone == 'checkpoint' else '_' + cfg.backbone
    cfg.out_dir = cfg.out_dir or os.path.join('out', 'eval', cfg.mode + suffix)
    env = common.Env(cfg)
    result = modes[cfg.mode](cfg, env)
    if result is not None:  # compare printed its own table
        env.print(*[] if cfg.mode == 'compare' else [f'{cfg.mode}: ' + ', '.join(
            f'{k} {v:.2f}' if isinstance(v, float) else f'{k} {v}' for k, v in result.items())])
        record(cfg, env, dict(mode=cfg.mode, checkpoint=cfg.checkpoint, backbone=cfg.backbone, **result))
    env.close()
    return result


if __name__ == '__main__':
    main()
