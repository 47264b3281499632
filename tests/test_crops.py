"""ImageNet crops (vitcl.data.crops): timm 0.4.12's RandomResizedCrop boxes and its evaluation resize + centre crop,
on JPEG files, per image in the lazy path's workers and on in-memory batches, deterministic across workers and
resumes."""
import math
import random

import numpy as np
import pytest
import torch

import timm_transforms
from helpers import TINY, interrupt_at_epoch, restored
from vitcl.data.crops import CropSpec, centre_box, crop_batch, crop_one, random_resized_box, short_side_size
from vitcl.data.dataset import ImageSet
from vitcl.data.sources.imagefolder import ImageFiles
from vitcl.data.stream import BatchStream, crop_keys
from vitcl.engine.trainer import Trainer
from vitcl.errors import ConfigError
from vitcl.runconfig import load_config

TIMM = timm_transforms.load()
needs_timm = pytest.mark.skipif(TIMM is None, reason="timm 0.4.12 not found (see tests/timm_reference.py)")
# (width, height): landscape, portrait, square, smaller than the output, and two beyond the 3/4..4/3 ratios
SIZES = [(320, 240), (180, 260), (256, 256), (90, 70), (500, 120), (64, 300)]
SPEC = CropSpec(224, 3, train="random-resized", interpolation="bicubic", test_crop_pct=0.875,
                test_interpolation="bicubic")


def smooth_image(width, height, seed):
    """Smooth colour gradients with some texture, as uint8 (H, W, 3)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.interpolate(torch.rand(1, 3, 4, 5, generator=g), size=(height, width), mode="bicubic")
    x = 30 + 190 * x[0] + 12 * torch.randn(3, height, width, generator=g)
    return x.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("jpegs")
    paths = []
    for k, (w, h) in enumerate(SIZES):
        path = folder / f"{k}.jpg"
        Image.fromarray(smooth_image(w, h, k)).save(path, quality=90)
        paths.append(str(path))
    return paths


def pil_rgb(path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def chw(pil_or_array):
    return torch.from_numpy(np.array(pil_or_array, dtype=np.uint8)).permute(2, 0, 1)


# ------------------------------------------------------------------------------------------------ boxes
def slow_box(width, height, scale, ratio, rng):
    """The published recipe written out step by step: 10 tries, then the centred fallback."""
    for _ in range(10):
        s = rng.uniform(scale[0], scale[1])
        log_r = rng.uniform(math.log(ratio[0]), math.log(ratio[1]))
        target = s * width * height
        r = math.exp(log_r)
        w, h = round(math.sqrt(target * r)), round(math.sqrt(target / r))
        if 1 <= w <= width and 1 <= h <= height:
            top = rng.randint(0, height - h)
            left = rng.randint(0, width - w)
            return top, left, h, w
    if width / height < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif width / height > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize("scale,ratio", [((0.08, 1.0), (3 / 4, 4 / 3)), ((0.9, 1.0), (1.0, 1.0)),
                                         ((0.05, 0.3), (0.5, 2.0))])
def test_box_equals_a_slow_transcription(scale, ratio):
    for seed in range(300):
        w, h = SIZES[seed % len(SIZES)]
        box = random_resized_box(w, h, scale, ratio, random.Random(seed))
        assert box == slow_box(w, h, scale, ratio, random.Random(seed))
        i, j, bh, bw = box
        assert 0 <= i and i + bh <= h and 0 <= j and j + bw <= w and bh > 0 and bw > 0
    # a 500x120 image with scale >= 0.9 and a square box never fits: the fallback is its centred 120x120
    assert random_resized_box(500, 120, (0.9, 1.0), (1.0, 1.0), random.Random(0)) == (0, 190, 120, 120)
    assert random_resized_box(64, 300, (0.9, 1.0), (1.0, 1.0), random.Random(0)) == (118, 0, 64, 64)


@needs_timm
def test_boxes_are_timms_for_the_same_draws():
    get_params = TIMM.RandomResizedCropAndInterpolation.get_params

    class Size:  # what get_params reads of a PIL image
        def __init__(self, w, h):
            self.size = (w, h)

    for scale, ratio in [((0.08, 1.0), (3 / 4, 4 / 3)), ((0.9, 1.0), (1.0, 1.0)), ((0.3, 0.6), (0.2, 5.0))]:
        for seed in range(200):
            w, h = SIZES[seed % len(SIZES)]
            random.seed(seed)
            theirs = get_params(Size(w, h), scale, ratio)
            assert random_resized_box(w, h, scale, ratio, random.Random(seed)) == theirs


# ------------------------------------------------------------------------------------------------ pixels
# Tolerance. Pillow resamples each axis with fixed-point (22-bit) coefficients and rounds to uint8 between the two
# passes; torch computes each pass in float, and vitcl.data.crops rounds in between as Pillow does. Where both take
# the axes in the same order a pixel differs by at most 1 level (fixed point against float); Pillow 13's choice of
# order is not fully predictable from the sizes, and where it differs the intermediate rounding differs: about 0.25
# levels on average, up to 3 (bicubic's negative lobes amplify a rounding step of 0.5). Hence per image: at most 3
# levels anywhere and 0.3 on average; over all images, at least 95% of the pixels equal.
MAX_LEVELS, MEAN_LEVELS, EQUAL = 3, 0.3, 0.95


def compare(ours, theirs, what):
    assert ours.shape == theirs.shape == (3, 224, 224), what
    d = (ours.float() - theirs.float()).abs()
    assert d.max() <= MAX_LEVELS and d.mean() <= MEAN_LEVELS, (what, d.max(), d.mean())
    return (d == 0).float().mean().item()


@needs_timm
def test_training_crop_equals_timms_on_jpegs(jpegs):
    timm_train = TIMM.transforms_imagenet_train(224, interpolation="bicubic", hflip=0.0, color_jitter=None,
                                                use_prefetcher=True)  # the crop alone, uint8 out (ToNumpy)
    files = ImageFiles(jpegs)
    equal = []
    for k, path in enumerate(jpegs):
        for key in (crop_keys(11, torch.tensor([k]))[0].item(), 7 + k, 1234567 + 3 * k):
            random.seed(key)  # timm draws from Python's global generator; ours from Random(key)
            theirs = torch.from_numpy(timm_train(pil_rgb(path)))
            equal.append(compare(crop_one(files(k), SPEC, True, key), theirs, (path, key)))
    assert np.mean(equal) >= EQUAL


@needs_timm
def test_evaluation_crop_equals_timms_on_jpegs(jpegs):
    timm_eval = TIMM.transforms_imagenet_eval(224, crop_pct=0.875, interpolation="bicubic", use_prefetcher=True)
    files = ImageFiles(jpegs)
    equal = [compare(crop_one(files(k), SPEC, False, None), torch.from_numpy(timm_eval(pil_rgb(path))), path)
             for k, path in enumerate(jpegs)]
    assert np.mean(equal) >= EQUAL


def test_evaluation_geometry():
    # short side to floor(224 / 0.875) = 256, the long side truncated; the centre offsets round half to even
    assert short_side_size(375, 500, 256) == (256, 341) and short_side_size(500, 375, 256) == (341, 256)
    assert centre_box(256, 341, 224) == (16, 58) and centre_box(256, 257, 224) == (16, 16)  # 16.5 -> 16
    assert centre_box(256, 259, 224) == (16, 18)  # 17.5 -> 18
    img = torch.arange(3 * 256 * 300, dtype=torch.float).remainder(251).to(torch.uint8).view(3, 256, 300)
    out = crop_one(img, SPEC, False, None)  # short side already 256: no resampling, a pure centre crop
    assert torch.equal(out, img[:, 16:240, 38:262])


# ------------------------------------------------------------------------------------------------ the stream
def lossless_set(tmp_path, n=6):
    """The same images as PNG files (a lazy set) and in memory (one size): decoded alike, bit for bit."""
    from PIL import Image

    arrays = [smooth_image(40, 40, 100 + k) for k in range(n)]
    paths = []
    for k, a in enumerate(arrays):
        paths.append(str(tmp_path / f"{k}.png"))
        Image.fromarray(a).save(paths[-1])
    targets = torch.arange(n) % 2
    lazy = ImageSet(targets, None, ImageFiles(paths), image_size=32, channels=3)
    memory = ImageSet(targets, torch.stack([torch.from_numpy(a).permute(2, 0, 1) for a in arrays]))
    return lazy, memory


def test_worker_crops_do_not_depend_on_workers_and_match_the_in_memory_path(tmp_path):
    lazy, memory = lossless_set(tmp_path)
    spec = CropSpec(32, 3, train="random-resized", interpolation="bicubic", test_crop_pct=0.875)
    batches = [torch.tensor([0, 3, 5]), torch.tensor([1, 1, 4])]  # row 1 twice: two different crops
    keys = [crop_keys(99, torch.arange(0, 3)), crop_keys(99, torch.arange(3, 6))]
    cpu = torch.device("cpu")
    runs = {}
    for workers in (0, 2):
        stream = BatchStream(lazy, cpu, workers, spec)
        runs[workers] = [x for x, _ in stream(batches, train=True, keys=keys)]
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[2]))
    assert not torch.equal(runs[0][1][0], runs[0][1][1])
    resident = [x for x, _ in BatchStream(memory, cpu, 0, spec)(batches, train=True, keys=keys)]
    assert all(torch.equal(a, b) for a, b in zip(runs[0], resident))
    # another epoch seed, other crops; the evaluation crop has no randomness
    other = [x for x, _ in BatchStream(lazy, cpu, 0, spec)(batches, train=True, keys=[crop_keys(98, k % 2**32)
                                                                                    for k in keys])]
    assert not torch.equal(other[0], runs[0][0])
    tests = [torch.cat([x for x, _ in BatchStream(s, cpu, w, spec)(batches)]) for s, w in ((lazy, 2), (memory, 0))]
    assert tests[0].shape == (6, 3, 32, 32) and torch.equal(tests[0], tests[1])
    # without keys (the herding features under augmentation) the draws come from torch's generator, in this process
    draws = []
    for workers in (0, 2):
        torch.manual_seed(5)
        draws.append(torch.cat([x for x, _ in BatchStream(lazy, cpu, workers, spec)(batches, train=True)]))
    assert torch.equal(draws[0], draws[1])


def test_in_memory_batch_crop_is_per_image():
    spec = CropSpec(16, 3, train="random-resized")
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    keys = torch.tensor([1, 2, 3, 4])
    out = crop_batch(x, spec, True, keys)
    assert torch.equal(out[2], crop_one(x[2], spec, True, 3))
    assert crop_batch(x, CropSpec(16, 3), True, keys) is x  # pad-crop configs: untouched


# ------------------------------------------------------------------------------------------------ the engine
IMAGENET_LIKE = [*TINY, "data.dataset=imagefolder", "data.image_size=16", "data.num_workers=0",
                 "data.augment.crop=random-resized", "data.augment.crop_padding=0", "data.augment.crop_interpolation=bicubic",
                 "data.test_crop_pct=0.875", "data.increment=2", "model.patch_size=4", "train.epochs=2",
                 "train.batch_size=4", "memory.size=4", "data.augment.hflip=true", "run.threads=1"]


def jpeg_tree(folder):
    from PIL import Image

    for split, n in (("train", 4), ("test", 1)):
        for c in range(4):
            for i in range(n):
                (folder / split / f"c{c}").mkdir(parents=True, exist_ok=True)
                w, h = SIZES[(c + i) % len(SIZES)]
                Image.fromarray(smooth_image(w // 4, h // 4, 10 * c + i)).save(folder / split / f"c{c}" / f"{i}.jpg")
    return folder


class Recorder:
    """Wraps a BatchStream and keeps every training batch it yields."""

    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def __call__(self, batches, train=False, keys=None):
        for x, idx in self.stream(batches, train=train, keys=keys):
            if train:
                self.log.append((idx.clone(), x.clone()))
            yield x, idx


def trainer(run_dir, data, log):
    cfg, _ = load_config(["replay/digits-b0inc2"], [*IMAGENET_LIKE, f"data.root={data}"])
    run_dir.mkdir(parents=True, exist_ok=True)
    t = Trainer(cfg, run_dir, progress=False)
    t.train_stream = Recorder(t.train_stream, log)
    return t


def test_crops_are_the_same_after_a_resume(tmp_path):
    data = jpeg_tree(tmp_path / "data")
    full: list = []
    trainer(tmp_path / "a", data, full).fit()
    cut: list = []
    t = trainer(tmp_path / "b", data, cut)
    interrupt_at_epoch(t, 4)  # task 1, after its first epoch was checkpointed
    resumed_log: list = []
    resumed = trainer(tmp_path / "b", data, resumed_log)
    opt_state = restored(resumed, tmp_path / "b" / "checkpoints" / "last.pt")
    assert (resumed.state.task, resumed.state.epoch) == (1, 1)
    resumed.fit(opt_state)
    # the resumed run sees exactly the batches (rows and crops) of the uninterrupted one from epoch 2 of task 1
    tail = full[-len(resumed_log):]
    assert len(resumed_log) >= 3 and len(cut) + len(resumed_log) >= len(full)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(tail, resumed_log))
    assert all(x.shape[-2:] == (16, 16) for _, x in full)


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("override,key", [
    ("data.augment.random_resized_scale=[0.5,0.1]", "data.augment.random_resized_scale"),
    ("data.augment.random_resized_scale=[0.08,1.5]", "data.augment.random_resized_scale"),
    ("data.augment.random_resized_scale=[0.5]", "data.augment.random_resized_scale"),
    ("data.augment.random_resized_ratio=[0,1]", "data.augment.random_resized_ratio"),
    ("data.augment.random_resized_ratio=[2,1]", "data.augment.random_resized_ratio"),
    ("data.test_crop_pct=0", "data.test_crop_pct"),
    ("data.test_crop_pct=1.2", "data.test_crop_pct"),
    ("data.augment.crop=centre", "data.augment.crop"),
    ("data.augment.crop_interpolation=nearest", "data.augment.crop_interpolation"),
    ("data.augment.crop_padding=4", "data.augment.crop_padding"),
])
def test_bad_crop_settings_name_the_key(override, key):
    with pytest.raises(ConfigError, match=f"^{key}"):
        load_config(["replay/digits-b0inc2"], ["data.augment.crop=random-resized", "data.augment.crop_padding=0",
                                               override])


def test_imagenet_presets_take_timms_crops():
    for preset in ("dytox/imagenet100-b0inc10", "dytox/imagenet1000-b0inc100", "lpa/imagenet100-b10inc10",
                   "lpa-baseline/imagenet100-b50inc5", "dytox-plus-lpa/imagenet100-b50inc10"):
        d = load_config([preset], [])[0].data
        a = d.augment
        assert (a.crop, a.random_resized_scale, a.random_resized_ratio, a.crop_interpolation) == \
            ("random-resized", [0.08, 1.0], [0.75, 4 / 3], "bicubic"), preset
        assert (d.test_crop_pct, d.test_interpolation, a.crop_padding) == (0.875, "bicubic", 0), preset
    for preset in ("rkr/imagenet-10tasks-resnet18", "mask-rkr/imagenet-10tasks-vit-b16", "dytox/cifar100-b0inc10"):
        d = load_config([preset], [])[0].data
        assert d.augment.crop == "pad" and d.test_crop_pct is None, preset
