"""Shared test settings: a tiny digits run that takes a second or two on CPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")

TINY = [
    "data.train_per_class=24", "data.test_per_class=10",
    "model.embed_dim=16", "model.depth=1", "model.num_heads=2",
    "train.epochs=2", "train.batch_size=16", "train.warmup_epochs=0", "eval.batch_size=64",
]


# backbones a method built for ResNets (BiC, E2E, WA) must also run on: tiny enough for a two-task run in seconds
SMALL_BACKBONES = {
    "resnet32": ["model.name=resnet32"],
    "vit": ["model.name=vit", "model.embed_dim=16", "model.depth=1", "model.num_heads=2"],
    "convit": ["model.name=convit", "model.patch_size=2", "model.embed_dim=16", "model.num_heads=2", "model.depth=2",
               "model.local_up_to_layer=1"],
}


def fit_on_backbone(preset: str, backbone: str, out: Path, *extra: str) -> dict:
    """The results of a two-task digits run (8 training images per class, one epoch) of `preset` on one of
    SMALL_BACKBONES."""
    from vitcl.engine.trainer import Trainer
    from vitcl.runconfig import load_config

    cfg, _ = load_config([preset], ["data.train_per_class=8", "data.test_per_class=4", "data.increment=[5,5]",
                                    "train.epochs=1", "train.batch_size=16", "memory.size=40", "run.progress=false",
                                    "run.threads=1", f"run.out_dir={out}", *extra, *SMALL_BACKBONES[backbone]])
    (out / "r").mkdir()
    return Trainer(cfg, out / "r", progress=False).fit()


def run_cli(*args: str, check: bool = False, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "vitcl", *args], capture_output=True, text=True, env=env, **kwargs)
    if check and proc.returncode:
        raise AssertionError(f"vitcl {' '.join(args)} failed:\n{proc.stderr}")
    return proc


# fields of metrics.jsonl and results.json that differ between two runs of the same config (wall clock, memory)
TIMING = ("seconds", "images_per_s", "peak_memory_bytes")


def without_timing(obj):
    if isinstance(obj, dict):
        return {k: without_timing(v) for k, v in obj.items() if k not in TIMING}
    if isinstance(obj, list):
        return [without_timing(v) for v in obj]
    return obj


def metrics_records(run_dir: Path) -> list:
    """metrics.jsonl of a run, timing fields aside."""
    return [without_timing(json.loads(x)) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def interrupt_at_epoch(trainer, n: int) -> None:
    """Run trainer.fit() and stop it (KeyboardInterrupt) as its n-th epoch, counted over tasks and phases, begins:
    the epochs before it are checkpointed, as a killed run leaves them."""
    import pytest

    original, calls = trainer.train_epoch, {"n": 0}

    def stop(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    trainer.train_epoch = stop
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()


def restored(trainer, checkpoint: Path):
    """The optimiser state to pass to trainer.fit(), after restoring trainer from a checkpoint file."""
    import torch

    return trainer.restore(torch.load(checkpoint, weights_only=False))


VIT = ["model.embed_dim=16", "model.depth=1", "model.num_heads=2"]
CONVIT = ["model.embed_dim=16", "model.depth=2", "model.num_heads=2", "model.local_up_to_layer=1"]
RESNET = ["model.width=8"]
# each method's tiny digits run (two tasks: the second has a teacher, a memory, old classes)
TINY_METHODS = {m: VIT for m in ("finetune", "replay", "joint")}
TINY_METHODS |= {m: RESNET for m in ("lwf", "ewc", "icarl", "ucir", "wa", "bic", "podnet", "e2e", "der", "er", "dark-er",
                                "dark-er-pp", "agem", "fdr", "gem", "gss", "hal")}
TINY_METHODS |= {"dytox": [*CONVIT, "data.augment.randaugment=rand-m9-mstd0.5-inc1"],  # and timm's RandAugment
            "lpa": [*CONVIT, "method.kd_samples=memory"], "lpa-baseline": CONVIT, "lvt": ["model.dims=[8,16]"]}
# the task-IL family, on digits split into two tasks with a head each
TASK_IL = ["data.setting=task-il", "data.class_order=null", "model.name=resnet18", "model.stem=cifar", *RESNET,
           "data.augment.crop_padding=0"]
TINY_METHODS |= {m: [f"method.name={m}", *TASK_IL] for m in ("multi-head", "rkr", "piggyback", "mask-rkr", "single")}
# the pretrained-ViT family, on a tiny randomly initialised ViT (the tasks' trainable parts are the same)
VIT_PT = ["model.name=vit", "model.patch_size=4", "model.embed_dim=16", "model.depth=2", "model.num_heads=2",
          "model.pool=token", "model.pretrained=null", "memory.size=0", "data.augment.crop_padding=0"]
TINY_METHODS |= {m: [f"method.name={m}", *VIT_PT, *extra] for m, extra in {
    "aper": ["method.bottleneck=4", "method.prompt_length=2"], "simplecil": [],
    "ranpac": ["method.bottleneck=4", "method.projection_dim=48"], "ease": ["method.bottleneck=4"],
    "slca": ["method.ca_epochs=1", "method.ca_samples=8"],
    "l2p": ["method.pool_size=4", "method.length=2", "method.top_k=2"],  # batchwise prompt choice in training
    "dualprompt": ["method.g_length=2", "method.g_layers=[0]", "method.e_length=3", "method.e_layers=[1]"],
    "coda-prompt": ["method.pool_size=4", "method.length=2", "method.layers=[0,1]"]}.items()}


def tiny_method(method: str) -> tuple[str, list[str]]:
    """The digits preset and the overrides of `method`'s tiny run (TINY_METHODS)."""
    tiny = TINY_METHODS[method]
    return ("finetune/digits-b0inc2" if f"method.name={method}" in tiny else f"{method}/digits-b0inc2"), tiny
