"""Data for the three stages: the datasets (the demo generator, ImageNet-layout folders, torchvision's
sets, ADE20K for segmentation, the ImageNet-A/R class indices), the augmentations (crops, timm's
RandAugment, the mmseg segmentation pipeline), and a loader whose batches a resumed run sees again exactly."""
import os
import random

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.datasets as tvd
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageStat
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import common

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# ----------------------------------------------------------------------------- datasets


def square_wave(t):  # True on the first half of every unit period
    return np.sin(2 * np.pi * t) > 0


class DemoTextures(Dataset):
    """Offline demo data, generated from (split, index): a large object (disk, square or triangle) covered by one
    of five two-colour patterns (the class: horizontal or vertical stripes, diagonal lattice, checks, dots; flips
    keep it) at a random period and phase, on a plain background; the colours are random. Most of the pixel
    variance is colour, which says nothing of the class, while the pattern decides the demo teacher's target (HOG):
    why, in docs/results.md. Items: (PIL image, class) or, with masks=True, (PIL image, per-pixel class map with
    0 = background and 1..5 = the object's class + 1)."""
    classes = ('horizontal', 'vertical', 'diagonal', 'checks', 'dots')

    def __init__(self, split='train', size=32, length=None, masks=False):
        self.split, self.size, self.masks = split, size, masks
        self.length = length if length is not None else 10000 if split == 'train' else 1000

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        g = np.random.default_rng([0 if self.split == 'train' else 1, i])
        label = int(g.integers(len(self.classes)))
        yy, xx = (np.mgrid[0:self.size, 0:self.size] + 0.5) / self.size  # pixel centres in (0, 1)
        r = g.uniform(0.32, 0.46)                                     # object half size
        cy, cx = 0.5 + g.uniform(-0.06, 0.06, size=2)
        dy, dx = (yy - cy) / r, (xx - cx) / r                         # object frame, unit half size
        obj = [dy ** 2 + dx ** 2 <= 1, np.maximum(abs(dy), abs(dx)) <= 0.85,
               (dy <= 0.8) & (dy >= 1.6 * abs(dx) - 1)][int(g.integers(3))]
        period = g.uniform(5, 9) / self.size                          # 5 to 9 pixels
        py, px = (yy - g.uniform()) / period, (xx - g.uniform()) / period  # random phase
        pattern = [square_wave(py), square_wave(px),                      # stripes
                   square_wave((px + py) / 1.4) ^ square_wave((px - py) / 1.4),  # diagonal lattice
                   square_wave(py) ^ square_wave(px),                       # checks
                   (py % 1 - 0.5) ** 2 + (px % 1 - 0.5) ** 2 < 0.09][label]  # dots
        ink, paper, bg = g.uniform(0, 1, size=(3, 3))
        while np.abs(ink - paper).mean() < 0.25:                      # keep the pattern visible
            paper = g.uniform(0, 1, 3)
        img = np.where(obj[..., None], np.where(pattern[..., None], ink, paper), bg)
        img = np.clip(img + g.normal(0, 0.03, img.shape), 0, 1)
        pil = Image.fromarray((img * 255).astype(np.uint8))
        if self.masks:
            return pil, Image.fromarray((obj * (label + 1)).astype(np.uint8))
        return pil, label


def build_dataset(spec, split, img_size):
    """spec: 'demo' (or demo:N), a folder in ImageNet layout (ROOT/train/CLASS/*.JPEG, ROOT/val/...), or
    NAME:ROOT for torchvision's cifar10, cifar100, stl10, fashion_mnist (files already there)."""
    name, _, root = spec.partition(':')
    if name == 'demo':  # demo or demo:N (N training images, at most N validation images)
        if root and not (root.isdigit() and int(root) > 0):
            common.die(f'--data={spec}: demo:N takes a number of training images N >= 1')
        return DemoTextures(split, img_size, min(int(root), 1000 if split == 'val' else int(root)) if root else None)
    tv = dict(cifar10=tvd.CIFAR10, cifar100=tvd.CIFAR100, stl10=tvd.STL10, fashion_mnist=tvd.FashionMNIST)
    if name in tv and root:
        if not os.path.isdir(root):
            common.die(f'data folder {root} does not exist')
        kw = dict(split='train' if split == 'train' else 'test') if name == 'stl10' else dict(train=split == 'train')
        try:
            return tv[name](root, download=False, **kw)
        except RuntimeError as e:
            common.die(f'{spec}: {str(e).splitlines()[0]} (downloads are off: put the files in {root})')
    if ':' in spec:
        common.die(f'--data={spec}: {name} is not a known dataset; use demo, demo:N, an ImageNet-layout folder or '
                   + ', '.join(f'{k}:ROOT' for k in tv))
    folder = os.path.join(spec, split)
    if not os.path.isdir(folder):
        common.die(f'data: {folder} does not exist (expected ImageNet layout ROOT/{split}/CLASS/image)')
    try:
        ds = tvd.ImageFolder(folder, loader=load_image)
    except FileNotFoundError as e:  # torchvision's words name the class folders without an image
        common.die(f'data: no images found under {folder}: {e}')
    train = os.path.join(spec, 'train')
    if split != 'train' and os.path.isdir(train):  # a label means the same class in every split: train's index
        train = tvd.folder.find_classes(train)[1]
        if set(ds.classes) - set(train):
            common.die(f'data: {folder} has classes {spec}/train lacks: {sorted(set(ds.classes) - set(train))[:5]}')
        ds.samples = ds.imgs = [(p, train[ds.classes[y]]) for p, y in ds.samples]
        ds.classes, ds.class_to_idx, ds.targets = list(train), train, [y for _, y in ds.samples]
    return ds


def load_image(path):
    try:
        with open(path, 'rb') as f:
            img = Image.open(f)
            if img.mode.startswith('I'):  # 16-bit grey (mode I;16 or I): 0-65535 to 8 bits, not clipped to white
                img = Image.fromarray((np.asarray(img, dtype=np.float64) / 257).clip(0, 255).astype(np.uint8))
            return img.convert('RGB')
    except Exception as e:  # any decoder error is the same problem for the user
        raise RuntimeError(f'unreadable image {path}: {e}') from None


def rgb(img):
    return img.convert('RGB') if img.mode != 'RGB' else img


class SegData(torch.utils.data.Dataset):
    """(image, mask) pairs: demo shapes (demo:N as build_dataset), or ADE20K (ROOT/images|annotations/
    training|validation, 150 classes with reduce_zero_label: 0 -> ignore 255)."""

    def __init__(self, spec, split, img_size):
        name, _, root = spec.partition(':')
        self.reduce_zero, self.num_classes = name == 'ade20k', 150
        if name == 'demo':
            self.items = build_dataset(spec, split, img_size)
            self.items.masks, self.num_classes = True, len(DemoTextures.classes) + 1
        elif name == 'ade20k':
            sub = 'training' if split == 'train' else 'validation'
            folder = os.path.join(root, 'images', sub)
            if not os.path.isdir(folder):
                common.die(f'ADE20K: {folder} does not exist (expected ROOT/images/{sub} and ROOT/annotations/{sub})')
            names = sorted(f[:-4] for f in os.listdir(folder) if f.endswith('.jpg'))
            self.items = [(os.path.join(folder, n + '.jpg'), os.path.join(root, 'annotations', sub, n + '.png'))
                          for n in names]
        else:
            common.die(f'segmentation data must be demo, demo:N or ade20k:ROOT, got {spec!r}')

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        item = self.items[i]
        img, mask = (load_image(item[0]), Image.open(item[1])) if isinstance(item[0], str) else item
        mask = torch.as_tensor(np.array(mask), dtype=torch.long)
        if self.reduce_zero:  # ADE20K: 0 = "other" is ignored, classes 1..150 -> 0..149
            mask = torch.where(mask == 0, 255, mask - 1)
        top = int(mask.masked_fill(mask == 255, 0).max())
        if top >= self.num_classes:
            raise RuntimeError(f'bad mask {item[1] if isinstance(item[1], str) else i}: class {top}, but '
                               f'{self.num_classes} classes')
        return rgb(img), mask


# robustness (paper Table 2, official --robust_test): ImageNet-A and ImageNet-R hold 200 of the 1000 ImageNet
# classes; a 1000-class model is scored with its logits restricted to those, in ImageNet order, which is also the
# sorted order of the sets' class folders. The official imagenet_a_r_indices.py gives them as masks over the sorted
# 1000 wnids; here each mask is a 1000-bit hex number, bit i from the left for class i.
def class_mask(hexdigits):  # -> the ImageNet-1k indices of the classes in the mask
    return tuple(i for i, bit in enumerate(f'{int(hexdigits, 16):01000b}') if bit == '1')  # the number parsed once


IMAGENET_A = class_mask('021543120521204003090062d05a400c280183000000000000010000003000020000041111243f751b23'
                         '8010005008202004e910c84a060400c60280128880002800a0130484604d1004000342003000f0002008'
                         '042900048001000080248214869820843805090151052012020180a0481040080e41512d00180cb800')
IMAGENET_R = class_mask('6ad403250101000101090822d85040242800db10f01820101111801001b0253219540c40dc940f311123'
                         '6c90506788000a444106004a144180430788110000001000000020120020111068004444040400006000'
                         '00000004000408000000001082981000040908804001080020101041001000009ec15d6415000d0800')

# ----------------------------------------------------------------------------- augmentation


class Crops:
    """Training views drawn as the official ops draw them: pretraining's DataAugmentationForBEiT (colour jitter 0.4 in
    a random order, a flip, ONE RandomResizedCrop box, a view of each distinct size of `sizes`: student, tokenizer; the
    block mask) or the tokenizer's (a box and a flip). Views leave the worker as uint8 (3, S, S): see to_device."""

    def __init__(self, sizes, min_scale, jitter=0.0, masker=None):
        self.sizes, self.scale, self.jitter, self.masker = dict.fromkeys(sizes), (min_scale, 1.0), jitter, masker

    def __call__(self, img, rng):  # in pretraining's order (jitter, flip, box; the tokenizer's box comes first: alike)
        jitter = T.ColorJitter.get_params(*[(1 - self.jitter, 1 + self.jitter)] * 3, None)[:4] if self.jitter else None
        flip, box = torch.rand(1).item() < 0.5, T.RandomResizedCrop.get_params(img, self.scale, (3 / 4, 4 / 3))
        return views(img, box, flip, jitter, self.sizes) + ((self.masker(rng),) if self.masker else ())


def views(img, box, flip, jitter, sizes):
    """PIL image img -> a uint8 (3, S, S) view for each S in sizes. The official order jitters the whole image, flips
    it, then crops `box` (i, j, h, w) and resizes (bicubic); here the mirrored box is cropped first, jittered with the
    same arithmetic (color_jitter), resized (torch's uint8 antialiased bicubic: PIL's kernel) and flipped."""
    i, j, h, w = box
    j = img.size[0] - j - w if flip else j
    region = img.crop((j, i, j + w, i + h))
    x = TF.pil_to_tensor(color_jitter(region, img, *jitter) if jitter else region)[None]
    out = (F.interpolate(x, (s, s), mode='bicubic', antialias=True)[0] for s in sizes)
    return tuple(v.flip(-1) if flip else v for v in out)


def color_jitter(region, img, order, brightness, contrast, saturation):
    """ColorJitter's PIL steps in the drawn order on the cropped region: brightness and saturation act per pixel;
    contrast blends with the whole image's grey mean after the steps before it, read off every k-th pixel and row."""
    k = max(1, min(img.size) // 64)
    small = img.resize((img.size[0] // k, img.size[1] // k), Image.NEAREST)
    for op in order.tolist():  # 0 brightness, 1 contrast, 2 saturation (3, hue, is off)
        if op == 1:  # PIL's ImageEnhance.Contrast: a blend with the mean grey level, rounded
            mean = int(ImageStat.Stat(small.convert('L')).mean[0] + 0.5)
            region = Image.blend(Image.new('RGB', region.size, (mean,) * 3), region, contrast)
        elif op != 3:
            f, v = (TF.adjust_brightness, brightness) if op == 0 else (TF.adjust_saturation, saturation)
            region, small = f(region, v), f(small, v)
    return region


def to_device(x, device):  # the workers' uint8 views -> floats in [0, 1] there
    return x.to(device, non_blocking=True).float().div_(255)


def normalize(x, mean=IMAGENET_MEAN, std=IMAGENET_STD):  # (B, 3, H, W), in place; per channel, with Python numbers:
    for c, (m, s) in enumerate(zip(mean, std)):           # nothing is copied to the device, nothing waits for it
        x[:, c].sub_(m).div_(s)
    return x


def eval_transform(img_size, normalize=True):
    """Resize to img_size / crop_pct (bicubic) + centre crop, as the official evaluation: crop_pct 0.875
    (224 / 256) below 384 px, 1.0 from 384 px on (official datasets.py)."""
    t = [T.Resize(int(img_size / (0.875 if img_size < 384 else 1.0)), interpolation=T.InterpolationMode.BICUBIC),
         T.CenterCrop(img_size), T.ToTensor()]
    return T.Compose(t + ([T.Normalize(IMAGENET_MEAN, IMAGENET_STD)] if normalize else []))


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
        self.fill = tuple(min(255, round(255 * m)) for m in IMAGENET_MEAN)  # (124, 116, 104)

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
    """The official mmseg 0.x ADE20K pipeline at crop size S (512 there), with ratios kept for other sizes. Train:
    resize to fit (4S, S) x U(0.5, 2), aspect kept (bilinear; masks nearest); an S x S crop, drawn again (up to 10
    times) while one class covers >= cat_max_ratio of its labelled pixels; flip; photometric distortion; normalise; pad
    bottom/right to S (image 0 = the mean colour after normalising, mask 255). Eval: resize to fit (4S, S); the mask is
    returned at its original size, where the prediction is scored."""

    def __init__(self, size, train, cat_max_ratio=0.75):
        self.size, self.train, self.cat_max_ratio = size, train, cat_max_ratio
        self.norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)

    def resize(self, img, mask, ratio=1.0):  # mmcv's imrescale: the largest size of the same aspect within (4S, S)
        (H, W), S = img.shape[1:], self.size * ratio
        f = min(4 * S / max(H, W), S / min(H, W))
        h, w = int(H * f + 0.5), int(W * f + 0.5)
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
        img, mask = T.functional.pil_to_tensor(rgb(item[0])), item[1]
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

# ----------------------------------------------------------------------------- loading, resumable


class Mapped(Dataset):  # dataset with a per-image transform (evaluation)
    def __init__(self, ds, t):
        self.ds, self.t = ds, t

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        img, y = self.ds[i]
        return self.t(rgb(img)), y


class Augmented(Dataset):
    """Applies `transform(image, rng)` with randomness fixed by (seed, epoch, index), so sample i
    of epoch e is augmented identically whichever worker loads it: a resumed run sees exactly the
    batches of an uninterrupted one. Keys come from ResumableSampler as (epoch, index)."""

    def __init__(self, dataset, transform, seed, joint=False):  # joint: transform(item, rng)
        self.dataset, self.transform, self.seed, self.joint = dataset, transform, seed, joint

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, i = key
        item = self.dataset[i]
        seed = ((self.seed * 1_000_003 + epoch) * 10_000_019 + i) % 2 ** 64  # what torch.manual_seed takes
        with torch.random.fork_rng(devices=[]):  # torchvision draws from torch's global RNG
            torch.default_generator.manual_seed(seed)  # the CPU's: torch.manual_seed seeds every backend (0.1 ms)
            if self.joint:  # e.g. (image, mask) pairs transformed together
                return self.transform(item, random.Random(seed))
            return self.transform(rgb(item[0]), random.Random(seed)), item[1]


class ResumableSampler(DistributedSampler):
    """DistributedSampler (also for one process) that yields (epoch, index) keys and can start
    mid-epoch: `start` = samples of this rank already consumed in the current epoch."""
    start = 0

    def __iter__(self):
        for i in list(super().__iter__())[self.start:]:
            yield self.epoch, i


def make_loader(dataset, transform, batch_size, workers, seed, env, joint=False):
    """A shuffled loader of `dataset` through `transform` for this rank, and its sampler."""
    ds = Augmented(dataset, transform, seed, joint)
    sampler = ResumableSampler(ds, num_replicas=env.world, rank=env.rank, shuffle=True, seed=seed, drop_last=True)
    loader = DataLoader(ds, batch_size=batch_size, sampler=sampler, drop_last=True, num_workers=workers,
                        pin_memory=env.device.type == 'cuda', persistent_workers=workers > 0,
                        generator=torch.Generator())  # leaves the global RNG alone (exact resume)
    return loader, sampler


def stream(loader, sampler, step, steps_per_epoch, accum):
    """The batches from optimizer step `step` on, epoch after epoch: a resumed run continues
    mid-epoch at the same sample. A worker's 'unreadable image' or 'bad mask' error becomes a one-line error."""
    epoch, it = divmod(step, steps_per_epoch)
    while True:
        sampler.set_epoch(epoch)
        sampler.start = it * accum * loader.batch_size
        data = iter(loader)
        for _ in range((steps_per_epoch - it) * accum):
            try:
                yield next(data)
            except RuntimeError as e:  # in a worker, the message is the last line of its traceback
                last = str(e).strip().splitlines()[-1].removeprefix('RuntimeError: ')
                if not last.startswith(('unreadable image', 'bad mask')):
                    raise
                common.die(last)
        epoch, it = epoch + 1, 0
