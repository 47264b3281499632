"""SimpleCIL: the prototypes of a tiny run against a per-image loop, the cosine scores against a transcription,
nothing trains (no phase, the backbone bit-identical), the prototype table in checkpoints, the presets."""
import math

import pytest
import torch

from vitcl.cli import main
from vitcl.engine.trainer import Trainer
from vitcl.runconfig import load_config

TINY = ["method.name=simplecil", "model.name=vit", "model.patch_size=4", "model.embed_dim=16", "model.depth=2",
        "model.num_heads=2", "model.pool=token", "model.pretrained=null", "data.train_per_class=12",
        "data.test_per_class=6", "data.increment=[4,3,3]", "memory.size=0", "eval.batch_size=64"]


def normalised(scenario, images):
    x = images.float() / 255
    return (x - torch.tensor(scenario.mean).view(1, -1, 1, 1)) / torch.tensor(scenario.std).view(1, -1, 1, 1)


@pytest.fixture(scope="module")
def simplecil_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("simplecil")
    cfg, _ = load_config(["data/digits-b0inc2"], TINY)
    trainer = Trainer(cfg, tmp, progress=False)
    start = {k: v.clone() for k, v in trainer.method.model.state_dict().items()}
    return trainer, trainer.fit(), start, tmp


def test_nothing_trains(simplecil_run):
    trainer, res, start, _ = simplecil_run
    assert res["tasks_done"] == 3 and trainer.method.phases(trainer.scenario[0]) == []
    for k, v in trainer.method.model.state_dict().items():
        assert torch.equal(v, start[k]), k
    assert all(t["trainable"] == 0 for t in res["tasks"])
    assert res["class_il"]["last"] > 10  # a random ViT's class means are still better than chance (10 classes)


def test_prototypes_are_class_means_one_image_at_a_time(simplecil_run):
    trainer, _, _, _ = simplecil_run
    m, sc = trainer.method, trainer.scenario
    backbone = m.model.backbone.eval()
    protos = m.prototypes.weight
    assert protos.shape == (10, 16)
    for t in range(3):
        task = sc[t]
        for c in range(task.offset, task.end):
            rows = task.train_idx[sc.train_labels[task.train_idx] == c].tolist()
            with torch.no_grad():
                feats = [backbone(normalised(sc, sc.train.images[r:r + 1]))[0] for r in rows]
            torch.testing.assert_close(protos[c], sum(feats) / len(rows), rtol=1e-4, atol=1e-5)


def test_scores_are_cosines_to_the_prototypes(simplecil_run):
    trainer, _, _, _ = simplecil_run
    m, sc = trainer.method, trainer.scenario
    x = normalised(sc, sc.test.images[:4])
    with torch.no_grad():
        got, f = m.logits(x), m.model(x)
    w = m.prototypes.weight
    for b in range(4):
        for c in range(10):
            cos = float(f[b] @ w[c]) / (float(f[b].norm()) * float(w[c].norm()))
            assert math.isclose(float(got[b, c]), cos, rel_tol=1e-4, abs_tol=1e-5)


def test_the_prototypes_come_back_from_a_checkpoint(simplecil_run):
    trainer, _, _, run_dir = simplecil_run
    fresh = Trainer(trainer.cfg, run_dir, progress=False)
    restored = [t for t, _ in fresh.restore_task_checkpoints()]
    assert restored == [0, 1, 2]
    torch.testing.assert_close(fresh.method.prototypes.weight, trainer.method.prototypes.weight, rtol=0, atol=0)


def test_presets_and_params_on_vit_b16(capsys):
    cfg, _ = load_config(["simplecil/cifar100-b0inc5-vitb16in21k"], [])
    assert (cfg.model.embed_dim, cfg.model.depth, cfg.model.norm_eps, cfg.data.image_size) == (768, 12, 1e-6, 224)
    cfg, _ = load_config(["simplecil/fashion-mnist-b0inc2-pretrained"], [])
    assert cfg.model.pool == "token" and cfg.model.pretrained is None
    assert main(["params", "simplecil/cifar100-b0inc5-vitb16in21k", "model.pretrained=null"]) == 0
    lines = capsys.readouterr().out.splitlines()
    first, last = lines[-20].split(), lines[-1].split()
    total_first, total_last = (int(v.replace(",", "")) for v in (first[2], last[2]))
    assert total_last - total_first == 768 * 95  # one prototype of 768 per class, nothing trainable
    assert first[4] == last[4] == "0"
