"""Data for the three stages: the datasets (the demo generator, image folders with or without
labels, torchvision's sets, ADE20K for segmentation), the augmentations (the pretraining and
tokenizer crops, the fine-tuning crops with timm's RandAugment, the mmseg segmentation pipeline),
and a loader whose batches a resumed run sees again exactly. A training transform takes a dataset
item and a random.Random."""
import os
import random

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.datasets as tvd
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageStat
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from settings import BadInput, die

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# -------------------------------------------------------------------- datasets


def square_wave(t):  # True on the first half of every unit period
    return np.sin(2 * np.pi * t) > 0


class DemoTextures(Dataset):
    """Offline demo data, generated from (split, index): a large object (disk, square or triangle)
    covered by one of five two-colour patterns (the class: horizontal or vertical stripes, diagonal
    lattice, checks, dots; flips keep it) at a random period and phase, on a plain background; the
    colours are random. Most of the pixel variance is colour, which says nothing of the class, while
    the pattern decides the demo teacher's target (HOG): why, in docs/results.md. Items: (PIL image,
    class) or, with masks=True, (PIL image, per-pixel class map with 0 = background and 1..5 = the
    object's class + 1)."""
    classes = ('horizontal', 'vertical', 'diagonal', 'checks', 'dots')

    def __init__(self, split='train', size=32, length=None, masks=False):
        self.split, self.size, self.masks, self.length = split, size, masks, length
        if length is None:
            self.length = 10000 if split == 'train' else 1000

    def __len__(self):
        return self.length

    def rng(self, i):
        return np.random.default_rng([0 if self.split == 'train' else 1, i])

    @property
    def targets(self):  # the labels alone: the first draw of each image's generator
        return [int(self.rng(i).integers(len(self.classes))) for i in range(len(self))]

    def __getitem__(self, i):
        g = self.rng(i)
        label = int(g.integers(len(self.classes)))
        yy, xx = (np.mgrid[:self.size, :self.size] + 0.5) / self.size  # pixel centres in (0, 1)
        r = g.uniform(0.32, 0.46)                                     # object half size
        cy, cx = 0.5 + g.uniform(-0.06, 0.06, size=2)
        dy, dx = (yy - cy) / r, (xx - cx) / r                         # object frame, unit half size
        shapes = [dy ** 2 + dx ** 2 <= 1,                             # disk
                  np.maximum(abs(dy), abs(dx)) <= 0.85,               # square
                  (dy <= 0.8) & (dy >= 1.6 * abs(dx) - 1)]            # triangle
        obj = shapes[int(g.integers(3))]
        period = g.uniform(5, 9) / self.size                          # 5 to 9 pixels
        py, px = (yy - g.uniform()) / period, (xx - g.uniform()) / period  # random phase
        patterns = [square_wave(py), square_wave(px),                      # stripes
                    square_wave((px + py) / 1.4) ^ square_wave((px - py) / 1.4),  # diagonal lattice
                    square_wave(py) ^ square_wave(px),                       # checks
                    (py % 1 - 0.5) ** 2 + (px % 1 - 0.5) ** 2 < 0.09]       # dots
        ink, paper, bg = g.uniform(size=(3, 3))  # in [0, 1)
        while np.abs(ink - paper).mean() < 0.25:                      # keep the pattern visible
            paper = g.uniform(size=3)
        img = np.where(obj[..., None], np.where(patterns[label][..., None], ink, paper), bg)
        img = np.clip(img + g.normal(0, 0.03, img.shape), 0, 1)
        pil = Image.fromarray((img * 255).astype(np.uint8))
        if self.masks:
            return pil, Image.fromarray((obj * (label + 1)).astype(np.uint8))
        return pil, label


def is_image(path):  # any extension PIL opens, in any case
    return path.lower().endswith(
        tuple(ext for ext, f in Image.registered_extensions().items() if f in Image.OPEN))


class ImageFiles(Dataset):
    """Every image under a folder, at any depth, without labels: items (image, 0). Stages 1 and 2
    need none."""

    def __init__(self, root):
        self.paths = []
        for folder, _, names in sorted(os.walk(root)):
            self.paths += [os.path.join(folder, n) for n in sorted(names) if is_image(n)]
        if not self.paths:
            die(f'data: no images found under {root}')

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return load_image(self.paths[i]), 0


def build_dataset(spec, split, img_size, labels=True):
    """spec: 'demo' or demo:N (N training images); an image folder; or NAME:ROOT for torchvision's
    cifar10, cifar100, stl10, fashion_mnist (files already there: no downloads). A folder with
    labels is in ImageNet's layout, ROOT/SPLIT/CLASS/image; without (labels=False) it is every image
    under ROOT/SPLIT, or under ROOT when it has no such folder."""
    name, _, root = spec.partition(':')
    if name == 'demo':
        if root and not (root.isdigit() and int(root) > 0):
            die(f'--data={spec}: demo:N takes a number of training images N >= 1')
        length = int(root) if root else None
        if length and split == 'val':  # at most 1000 validation images
            length = min(length, 1000)
        return DemoTextures(split, img_size, length)
    tv = dict(cifar10=tvd.CIFAR10, cifar100=tvd.CIFAR100, stl10=tvd.STL10,
              fashion_mnist=tvd.FashionMNIST)
    if name in tv and root:
        if not os.path.isdir(root):
            die(f'data folder {root} does not exist')
        if name == 'stl10':
            kw = dict(split='train' if split == 'train' else 'test')
        else:
            kw = dict(train=split == 'train')
        try:
            ds = tv[name](root, download=False, **kw)
        except RuntimeError as e:
            die(f'{spec}: {str(e).splitlines()[0]} (downloads are off: put the files in {root})')
        if name == 'stl10':
            ds.targets = ds.labels  # as the other sets name them
        return ds
    if ':' in spec:
        die(f'--data={spec}: {name} is not a known dataset; use demo, demo:N, an image folder or '
            + ', '.join(f'{k}:ROOT' for k in tv))
    folder = os.path.join(spec, split)
    if not os.path.isdir(spec):
        die(f'data folder {spec} does not exist')
    if not labels:  # the split's folder, else (train) the whole folder; no val folder: None
        if os.path.isdir(folder):
            return ImageFiles(folder)
        return ImageFiles(spec) if split == 'train' else None
    if not os.path.isdir(folder):
        die(f'data: {folder} does not exist: this stage needs labels, an ImageNet-layout folder '
            f'(ROOT/{split}/CLASS/image)')
    try:
        ds = tvd.ImageFolder(folder, loader=load_image, is_valid_file=is_image)
    except FileNotFoundError as e:  # torchvision's words name the class folders without an image
        die(f'data: no images found under {folder}: {e}')
    train = os.path.join(spec, 'train')
    if split != 'train' and os.path.isdir(train):  # a label: the same class in every split, train's
        train = tvd.folder.find_classes(train)[1]
        extra = sorted(set(ds.classes) - set(train))
        if extra:
            die(f'data: {folder} has classes {spec}/train lacks: {extra[:5]}')
        ds.samples = ds.imgs = [(p, train[ds.classes[y]]) for p, y in ds.samples]
        ds.classes, ds.class_to_idx, ds.targets = list(train), train, [y for _, y in ds.samples]
    return ds


def labelled(ds, labels, seed):
    """The labelled training images of a low-label run: `labels` is 'all', a share of each class
    ('10%') or a count per class ('60'), each class's drawn from the seed."""
    if labels == 'all':
        return ds
    targets, g, keep = torch.as_tensor(ds.targets), torch.Generator().manual_seed(seed), []
    for c in targets.unique():
        mine = (targets == c).nonzero().flatten()
        n = int(labels) if labels.isdigit() else max(1, round(len(mine) * float(labels[:-1]) / 100))
        keep += mine[torch.randperm(len(mine), generator=g)[:n]].tolist()
    sub = Subset(ds, sorted(keep))
    sub.classes = ds.classes
    return sub


def load_image(path):
    try:
        with open(path, 'rb') as f:
            img = Image.open(f)
            if img.mode.startswith('I'):  # 16-bit grey (I;16, I): 0-65535 to 8 bits, not white
                grey = np.asarray(img, dtype=np.float64) / 257
                img = Image.fromarray(grey.clip(0, 255).astype(np.uint8))
            return img.convert('RGB')
    except Exception as e:  # any decoder error is the same problem for the user
        raise BadInput(f'unreadable image {path}: {e}') from None


def rgb(img):
    return img.convert('RGB') if img.mode != 'RGB' else img


class SegData(Dataset):
    """(image, mask) pairs: demo shapes (demo:N as build_dataset), or ADE20K
    (ROOT/images|annotations/ training|validation, 150 classes with reduce_zero_label: 0 -> ignore
    255)."""

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
                die(f'ADE20K: {folder} does not exist (expected ROOT/images/{sub} and '
                    f'ROOT/annotations/{sub})')
            names = sorted(f[:-4] for f in os.listdir(folder) if f.endswith('.jpg'))
            masks = os.path.join(root, 'annotations', sub)
            self.items = [(os.path.join(folder, n + '.jpg'), os.path.join(masks, n + '.png'))
                          for n in names]
        else:
            die(f'segmentation data must be demo, demo:N or ade20k:ROOT, got {spec!r}')

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
            name = item[1] if isinstance(item[1], str) else i
            raise BadInput(f'bad mask {name}: class {top}, but {self.num_classes} classes')
        return rgb(img), mask


# ---------------------------------------------------------------- augmentation


class Crops:
    """The training views of stages 1 and 2, drawn as the official ops draw them. Pretraining's
    DataAugmentationForBEiT: colour jitter 0.4 in a random order, a flip, ONE RandomResizedCrop box
    cut at each of `sizes` (the student's, then the tokenizer's, when it differs), and the block
    mask. The tokenizer's stage: a box and a flip. -> dict(images, tokenizer_images (another size
    only), mask (with a masker)); the views are uint8 (3, S, S), made floats on the device
    (to_device)."""

    def __init__(self, sizes, min_scale, jitter=0.0, masker=None):
        self.sizes = dict.fromkeys(sizes)  # each distinct size once, in order
        self.scale, self.jitter, self.masker = (min_scale, 1.0), jitter, masker

    def __call__(self, item, rng):  # the draws in the official order: jitter, flip, box
        img = rgb(item[0])
        jitter = None
        if self.jitter:
            jitter = T.ColorJitter.get_params(*[(1 - self.jitter, 1 + self.jitter)] * 3, None)[:4]
        flip = torch.rand(1).item() < 0.5
        box = T.RandomResizedCrop.get_params(img, self.scale, (3 / 4, 4 / 3))
        out = dict(zip(('images', 'tokenizer_images'), views(img, box, flip, jitter, self.sizes)))
        if self.masker:
            out['mask'] = self.masker(rng)
        return out


def views(img, box, flip, jitter, sizes):
    """PIL image img -> a uint8 (3, S, S) view for each S in sizes. The official order jitters the
    whole image, flips it, then crops `box` (i, j, h, w) and resizes (bicubic); here the mirrored
    box is cropped first, jittered with the same arithmetic (color_jitter), resized (torch's uint8
    antialiased bicubic: PIL's kernel) and flipped."""
    i, j, h, w = box
    j = img.size[0] - j - w if flip else j
    region = img.crop((j, i, j + w, i + h))
    if jitter:
        region = color_jitter(region, img, *jitter)
    x = TF.pil_to_tensor(region)[None]
    out = [F.interpolate(x, (s, s), mode='bicubic', antialias=True)[0] for s in sizes]
    return [v.flip(-1) if flip else v for v in out]


def color_jitter(region, img, order, brightness, contrast, saturation):
    """ColorJitter's PIL steps in the drawn order on the cropped region: brightness and saturation
    act per pixel; contrast blends with the whole image's grey mean after the steps before it, read
    off every k-th pixel and row."""
    k = max(1, min(img.size) // 64)
    small = img.resize((img.size[0] // k, img.size[1] // k), Image.NEAREST)
    for op in order.tolist():  # 0 brightness, 1 contrast, 2 saturation (3, hue, is off)
        if op == 1:  # PIL's ImageEnhance.Contrast: a blend with the mean grey level, rounded
            mean = int(ImageStat.Stat(small.convert('L')).mean[0] + 0.5)
            region = Image.blend(Image.new('RGB', region.size, (mean,) * 3), region, contrast)
        elif op != 3:
            if op == 0:
                region = TF.adjust_brightness(region, brightness)
                small = TF.adjust_brightness(small, brightness)
            else:
                region = TF.adjust_saturation(region, saturation)
                small = TF.adjust_saturation(small, saturation)
    return region


def to_device(x, device):  # the workers' uint8 views -> floats in [0, 1] there
    return x.to(device, non_blocking=True).float().div_(255)


def normalize(x, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """(B, 3, H, W) in [0, 1], normalised IN PLACE, channel by channel with Python numbers: no
    tensor is copied to the device, so nothing waits for it (torchvision's normalize reads std back
    from the device)."""
    for c, (m, s) in enumerate(zip(mean, std)):
        x[:, c].sub_(m).div_(s)
    return x


def eval_transform(img_size, normalized=True):
    """Resize to img_size / crop_pct (bicubic) + centre crop, as the official evaluation: crop_pct
    0.875 (224 / 256) below 384 px, 1.0 from 384 px on (official datasets.py); then ImageNet's mean
    and std."""
    crop_pct = 0.875 if img_size < 384 else 1.0
    t = [T.Resize(int(img_size / crop_pct), interpolation=T.InterpolationMode.BICUBIC),
         T.CenterCrop(img_size), T.ToTensor()]
    if normalized:
        t.append(T.Normalize(IMAGENET_MEAN, IMAGENET_STD))
    return T.Compose(t)


class TrainTransform:
    """Linear probing and fine-tuning: RandomResizedCrop + flip (bicubic as MAE's probe and the
    official fine-tuning; bilinear as BEiT v1's probe); fine-tuning adds RandAugment (timm's
    rand-m9-mstd0.5-inc1, the official --aa) and random erasing (pixel mode; timm's area 2% to 1/3,
    aspect 0.3 to 1/0.3). -> (x, label)."""

    def __init__(self, img_size, min_scale, bilinear=False, randaug=False, reprob=0.0):
        mode = T.InterpolationMode.BILINEAR if bilinear else T.InterpolationMode.BICUBIC
        self.crop = T.Compose([
            T.RandomResizedCrop(img_size, scale=(min_scale, 1.0), interpolation=mode),
            T.RandomHorizontalFlip()])
        self.randaug = RandAugment() if randaug else None
        after = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        if reprob > 0:
            after.append(T.RandomErasing(reprob, scale=(0.02, 1 / 3), ratio=(0.3, 1 / 0.3),
                                         value='random'))
        self.after = T.Compose(after)

    def __call__(self, item, rng):
        img = self.crop(rgb(item[0]))
        if self.randaug:
            img = self.randaug(img, rng)
        return self.after(img), item[1]


class RandAugment:
    """timm's rand-m9-mstd0.5-inc1, the official fine-tuning `--aa`, with torchvision's and PIL's
    ops: `layers` ops drawn with replacement from OPS; each applied with probability `prob`, at a
    magnitude drawn from N(magnitude, std) clipped to [0, 10] (timm's _LEVEL_DENOM) and mapped to
    its range, signed ops negated with probability 0.5; fill = the ImageNet mean colour, bicubic
    resampling (the official hyper-parameters). rng: a random.Random; the draws come in timm's
    order."""
    OPS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'PosterizeIncreasing',
           'SolarizeIncreasing',
           'SolarizeAdd', 'ColorIncreasing', 'ContrastIncreasing', 'BrightnessIncreasing',
           'SharpnessIncreasing', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel')
    ENHANCE = {'Color': TF.adjust_saturation, 'Contrast': TF.adjust_contrast,
               'Brightness': TF.adjust_brightness,
               'Sharpness': TF.adjust_sharpness}
    fill = tuple(min(255, round(255 * m)) for m in IMAGENET_MEAN)  # (124, 116, 104)

    def __call__(self, img, rng):
        for name in rng.choices(self.OPS, k=2):  # 2 layers
            if rng.random() > 0.5:  # each op with probability 0.5
                continue
            level = max(0.0, min(rng.gauss(9.0, 0.5), 10.0)) / 10  # in [0, 1]
            img = self.apply(img, name, level, rng)
        return img

    def apply(self, img, name, level, rng):
        """One op at `level` in [0, 1] (timm's magnitude / 10), on a PIL RGB image."""
        def signed(v):  # timm's _randomly_negate
            return -v if rng.random() > 0.5 else v
        plain = {'AutoContrast': TF.autocontrast, 'Equalize': TF.equalize, 'Invert': TF.invert}
        if name in plain:
            return plain[name](img)
        if name == 'Rotate':                                      # up to 30 degrees
            return TF.rotate(img, signed(level * 30), T.InterpolationMode.BICUBIC, fill=self.fill)
        if name == 'PosterizeIncreasing':                         # keep 4 down to 0 bits
            bits = 4 - int(level * 4)  # 0 (magnitude 10) is black; newer PIL refuses posterize(0)
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
            if name == 'TranslateXRel':
                matrix = (1, 0, t * img.size[0], 0, 1, 0)
            else:
                matrix = (1, 0, 0, 0, 1, t * img.size[1])
        return img.transform(img.size, Image.AFFINE, matrix, Image.BICUBIC, fillcolor=self.fill)


def photometric_distortion(img, rng):
    """mmseg 0.x's PhotoMetricDistortion on a uint8 (3, H, W) image: each step with probability 0.5,
    in its order: brightness +- 32, contrast x 0.5-1.5 (before or after the colour steps, at
    random), saturation x 0.5-1.5 and hue +- 18 of OpenCV's 180 (computed in float here: mmseg
    rounds through OpenCV's uint8 HSV, a difference of a level at most)."""
    def convert(x, alpha=1.0, beta=0.0):  # mmseg's convert: scale, shift, clip, back to uint8
        return (x.float() * alpha + beta).clamp(0, 255).to(torch.uint8)
    if rng.randint(0, 1):
        img = convert(img, beta=rng.uniform(-32, 32))
    contrast_first = rng.randint(0, 1)
    if contrast_first and rng.randint(0, 1):
        img = convert(img, alpha=rng.uniform(0.5, 1.5))
    if rng.randint(0, 1):  # HSV saturation x alpha, same hue and value: each channel moves from V
        x = img.float()
        v, low = x.max(0).values, x.min(0).values
        sat = torch.where(v > 0, (v - low) / v.clamp(min=1), torch.zeros_like(v))
        new = (sat * rng.uniform(0.5, 1.5)).clamp(max=1)
        ratio = torch.where(sat > 0, new / sat.clamp(min=1e-12), torch.ones_like(sat))
        img = (v - (v - x) * ratio).round().clamp(0, 255).to(torch.uint8)
    if rng.randint(0, 1):
        shift = rng.randint(-18, 17)  # numpy's randint, in mmseg, excludes 18
        img = TF.adjust_hue(img, shift / 180)
    if not contrast_first and rng.randint(0, 1):
        img = convert(img, alpha=rng.uniform(0.5, 1.5))
    return img


class SegTransform:
    """The official mmseg 0.x ADE20K pipeline at crop size S (512 there), with ratios kept for other
    sizes. Train: resize to fit (4S, S) x U(0.5, 2), aspect kept (bilinear; masks nearest); an S x S
    crop, drawn again (up to 10 times) while one class covers >= cat_max_ratio of its labelled
    pixels; flip; photometric distortion; normalise; pad bottom/right to S (image 0 = the mean
    colour after normalising, mask 255). Eval: resize to fit (4S, S); the mask is returned at its
    original size, where the prediction is scored."""

    def __init__(self, size, train):
        self.size, self.train = size, train
        self.norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)

    def resize(self, img, mask, ratio=1.0):  # mmcv's imrescale: the largest size within (4S, S)
        (H, W), S = img.shape[1:], self.size * ratio
        f = min(4 * S / max(H, W), S / min(H, W))
        h, w = int(H * f + 0.5), int(W * f + 0.5)
        img = TF.resize(img, [h, w], T.InterpolationMode.BILINEAR, antialias=False)
        return img, TF.resize(mask[None], [h, w], T.InterpolationMode.NEAREST)[0]

    def crop_box(self, mask, rng):
        S, (H, W) = self.size, mask.shape
        for _ in range(10):  # mmseg: a first box, then up to 10 redraws
            y, x = rng.randint(0, max(H - S, 0)), rng.randint(0, max(W - S, 0))
            labels = mask[y:y + S, x:x + S]
            counts = torch.bincount(labels[labels != 255].flatten())
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < 0.75:  # cat_max_ratio
                break
        return y, x

    def __call__(self, item, rng):
        img, mask = TF.pil_to_tensor(rgb(item[0])), item[1]
        if not self.train:
            return self.norm(self.resize(img, mask)[0].float() / 255), mask
        img, mask = self.resize(img, mask, rng.uniform(0.5, 2.0))
        y, x = self.crop_box(mask, rng)
        img, mask = (t[..., y:y + self.size, x:x + self.size] for t in (img, mask))
        if rng.random() < 0.5:
            img, mask = img.flip(-1), mask.flip(-1)
        img = self.norm(photometric_distortion(img, rng).float() / 255)
        pad = (0, self.size - img.shape[2], 0, self.size - img.shape[1])  # bottom / right
        return F.pad(img, pad, value=0.0), F.pad(mask, pad, value=255)

# ---------------------------------------------------------- loading, resumable


class Mapped(Dataset):
    """A dataset's items through a transform of the image alone (evaluation, no randomness)."""

    def __init__(self, ds, t):
        self.ds, self.t = ds, t

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        img, y = self.ds[i]
        return self.t(rgb(img)), y


class Augmented(Dataset):
    """A dataset's items through `transform(item, rng)`, with the randomness fixed by (seed, epoch,
    index): sample i of epoch e is augmented alike whichever worker loads it, so a resumed run sees
    exactly the batches of an uninterrupted one. Keys come from ResumableSampler as (epoch,
    index)."""

    def __init__(self, dataset, transform, seed):
        self.dataset, self.transform, self.seed = dataset, transform, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, i = key
        item = self.dataset[i]
        seed = ((self.seed * 1_000_003 + epoch) * 10_000_019 + i) % 2 ** 64  # manual_seed's range
        with torch.random.fork_rng(devices=[]):  # torchvision draws from torch's global RNG
            torch.default_generator.manual_seed(seed)  # the CPU's (torch.manual_seed: all)
            return self.transform(item, random.Random(seed))


class ResumableSampler(DistributedSampler):
    """DistributedSampler (also for one process) that yields (epoch, index) keys and can start
    mid-epoch: `start` = the samples of this rank already seen in the current epoch."""
    start = 0

    def __iter__(self):
        for i in list(super().__iter__())[self.start:]:
            yield self.epoch, i


def make_loader(dataset, transform, cfg, env):
    """This rank's shuffled loader of `dataset` through `transform` (engine.stream runs it epoch by
    epoch)."""
    ds = Augmented(dataset, transform, cfg.seed)
    return DataLoader(ds, batch_size=cfg.batch_size, drop_last=True,
                      sampler=ResumableSampler(ds, env.world, env.rank, shuffle=True, seed=cfg.seed,
                                               drop_last=True),
                      num_workers=cfg.workers, persistent_workers=cfg.workers > 0,
                      pin_memory=env.device.type == 'cuda',
                      generator=torch.Generator())  # leaves the global RNG alone (exact resume)
