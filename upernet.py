"""UperNet on a ViT, the official BEiT segmentation model (semantic_segmentation/, mmseg 0.x): the
features of four blocks made into four scales, a pyramid-pooling + FPN decoder, an auxiliary FCN
head. The module names are mmseg's, so a released UperNet file loads by its key names; mmseg's loss
and scores."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class ConvModule(nn.Sequential):  # mmcv's ConvModule with BatchNorm: conv (no bias), bn, ReLU
    def __init__(self, cin, cout, k):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.activate = nn.ReLU(True)


class UPerHead(nn.Module):
    """mmseg's UPerHead: pyramid pooling (1, 2, 3, 6) on the coarsest scale + FPN fusion of all
    four."""

    def __init__(self, D, c, num_classes):
        super().__init__()
        self.psp_modules = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvModule(D, c, 1))
                                         for s in (1, 2, 3, 6))
        self.bottleneck = ConvModule(D + 4 * c, c, 3)
        self.lateral_convs = nn.ModuleList(ConvModule(D, c, 1) for _ in range(3))
        self.fpn_convs = nn.ModuleList(ConvModule(c, c, 3) for _ in range(3))
        self.fpn_bottleneck = ConvModule(4 * c, c, 3)
        self.dropout, self.conv_seg = nn.Dropout2d(0.1), nn.Conv2d(c, num_classes, 1)

    def forward(self, f):
        top = f[3]
        lat = [conv(x) for conv, x in zip(self.lateral_convs, f[:3])]
        pooled = [F.interpolate(p(top), top.shape[2:], mode='bilinear') for p in self.psp_modules]
        lat.append(self.bottleneck(torch.cat([top] + pooled, 1)))
        for i in range(3, 0, -1):                                  # the top-down path
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], lat[i - 1].shape[2:], mode='bilinear')
        outs = [conv(x) for conv, x in zip(self.fpn_convs, lat[:3])] + [lat[3]]
        outs = [F.interpolate(o, outs[0].shape[2:], mode='bilinear') for o in outs]
        return self.conv_seg(self.dropout(self.fpn_bottleneck(torch.cat(outs, 1))))


class FCNHead(nn.Module):  # mmseg's FCNHead, num_convs=1, no concat: the auxiliary head (stride 16)
    def __init__(self, D, num_classes, c=256):
        super().__init__()
        self.convs = nn.Sequential(ConvModule(D, c, 3))
        self.dropout, self.conv_seg = nn.Dropout2d(0.1), nn.Conv2d(c, num_classes, 1)

    def forward(self, x):
        return self.conv_seg(self.dropout(self.convs(x)))


class Segmenter(nn.Module):
    """Official BEiT segmentation: block features -> 4 scales (strides 4, 8, 16, 32: fpn1..fpn4 of
    the official backbone) -> UperNet (decode_head) and an auxiliary FCN head on the stride-16
    scale."""

    def __init__(self, backbone, layers, num_classes, channels=None):
        super().__init__()
        D = backbone.cfg.embed_dim
        self.backbone, self.layers = backbone, tuple(layers)
        self.cfg = backbone.cfg  # what a checkpoint saves as the model's config
        # no final norm, no blocks past the last one read: every parameter gets a gradient (DDP)
        backbone.norm = backbone.fc_norm = None
        del backbone.blocks[max(layers) + 1:]
        self.fpn1 = nn.Sequential(nn.ConvTranspose2d(D, D, 2, 2), nn.BatchNorm2d(D), nn.GELU(),
                                  nn.ConvTranspose2d(D, D, 2, 2))
        self.fpn2 = nn.Sequential(nn.ConvTranspose2d(D, D, 2, 2))
        self.fpn4 = nn.MaxPool2d(2)
        self.decode_head = UPerHead(D, channels or D, num_classes)
        self.auxiliary_head = FCNHead(D, num_classes)
        for name, m in self.named_modules():  # mmseg's init of the heads; the backbone keeps its
            if isinstance(m, nn.Conv2d) and not name.startswith('backbone'):
                if name.endswith('conv_seg'):  # N(0, 0.01)
                    nn.init.normal_(m.weight, std=0.01)
                    nn.init.zeros_(m.bias)
                else:                              # ConvModule: kaiming normal, fan_out, relu
                    nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')

    def forward(self, images):  # -> (logits, aux logits), each (B, classes, H, W)
        _, xs = self.backbone.forward_tokens(images, layers=self.layers)
        h, w = self.backbone.grid
        f = [x[:, 1:].transpose(1, 2).reshape(x.shape[0], -1, h, w) for x in xs]   # (B, D, h, w)
        f = [self.fpn1(f[0]), self.fpn2(f[1]), f[2], self.fpn4(f[3])]              # strides 4..32
        size = images.shape[2:]
        return (F.interpolate(self.decode_head(f), size, mode='bilinear'),
                F.interpolate(self.auxiliary_head(f[2]), size, mode='bilinear'))


def split_mmseg(sd):
    """An mmseg UperNet state dict (backbone.*, decode_head.*, auxiliary_head.*) -> (the ViT's
    state dict, the rest in our Segmenter's names: the official backbone holds fpn1/fpn2)."""
    backbone, heads = {}, {}
    for k, v in sd.items():
        vit = k.startswith('backbone.') and not k.startswith(('backbone.fpn1.', 'backbone.fpn2.'))
        (backbone if vit else heads)[k.removeprefix('backbone.')] = v
    return backbone, heads


def seg_loss(logits, target):
    """Cross entropy averaged over ALL pixels, the ignored ones (255) counted as 0: mmseg 0.x's
    default (avg_non_ignore=False), which the official segmentation code uses."""
    return F.cross_entropy(logits.float(), target, ignore_index=255, reduction='none').mean()


@torch.no_grad()
def sliding_window(model, images, num_classes, crop, stride, batch):
    """fp32 logits (classes, H, W) of each image (3, H, W) of the list: windows of crop x crop every
    `stride`, averaged; the windows of all the images go through the model `batch` at a time."""
    padded = [F.pad(im, (0, max(crop - im.shape[2], 0), 0, max(crop - im.shape[1], 0)))
              for im in images]

    def starts(size):  # the windows' first rows (or columns): every stride, the last at the end
        return sorted({min(s, size - crop) for s in range(0, max(size - crop, 0) + stride, stride)})
    boxes = []
    for i, im in enumerate(padded):
        boxes += [(i, y, x) for y in starts(im.shape[1]) for x in starts(im.shape[2])]
    windows = torch.stack([padded[i][:, y:y + crop, x:x + crop] for i, y, x in boxes])
    logits = torch.cat([model(w)[0].float() for w in windows.split(batch)])
    out = [im.new_zeros(num_classes, *im.shape[1:], dtype=torch.float) for im in padded]
    count = [im.new_zeros(im.shape[1:], dtype=torch.float) for im in padded]
    for (i, y, x), lg in zip(boxes, logits):
        out[i][:, y:y + crop, x:x + crop] += lg
        count[i][y:y + crop, x:x + crop] += 1
    return [(o / c)[:, :im.shape[1], :im.shape[2]] for o, c, im in zip(out, count, images)]


def confusion(pred, target, num_classes):
    keep = target != 255  # ignored
    return torch.bincount(target[keep] * num_classes + pred[keep],
                          minlength=num_classes ** 2).view(num_classes, -1)


def seg_scores(conf):
    """mmseg's three: mIoU (over the classes in the target or the prediction), mAcc (mean over the
    classes in the target of their pixels' accuracy) and aAcc (all pixels' accuracy)."""
    conf = conf.double()
    inter, union, seen = conf.diag(), conf.sum(0) + conf.sum(1) - conf.diag(), conf.sum(1) > 0
    scores = dict(mIoU=(inter[union > 0] / union[union > 0]).mean(),
                  mAcc=(inter[seen] / conf.sum(1)[seen]).mean(), aAcc=inter.sum() / conf.sum())
    return {k: v.item() * 100 for k, v in scores.items()}
