import pytest

from vitcl.errors import ConfigError
from vitcl.runconfig import from_dict, load_config, parse_override, preset_names


def test_presets_listed_and_loadable():
    names = preset_names()
    assert "replay/digits-b0inc2" in names
    assert not any(n.startswith(("data/", "base/")) for n in names)
    for name in names:
        load_config([name])


def test_stacked_files_and_overrides(tmp_path):
    data = tmp_path / "d.yaml"
    data.write_text("data: {dataset: digits, increment: 5}\n")
    method = tmp_path / "m.yaml"
    method.write_text("method: {name: replay}\nmemory: {size: 50}\ntrain: {epochs: 3}\n")
    cfg, _ = load_config([str(data), str(method)], ["train.epochs=7", "train.lr=1e-3", "model.depth=2"])
    assert cfg.data.increment == 5 and cfg.method.name == "replay" and cfg.memory.size == 50
    assert cfg.train.epochs == 7 and cfg.train.lr == pytest.approx(1e-3) and cfg.model.depth == 2


def test_defaults_are_merged_before_the_file(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text("defaults: [replay/digits-b0inc2]\ntrain: {epochs: 1}\n")
    cfg, _ = load_config([str(f)])
    assert cfg.train.epochs == 1 and cfg.method.name == "replay" and cfg.memory.size == 200


@pytest.mark.parametrize("override,key", [
    ("train.epochz=3", "train.epochz"),
    ("train.epochs=abc", "train.epochs"),
    ("train.epochs=0", "train.epochs"),
    ("train.lr=-1", "train.lr"),
    ("model.nope=1", "model.nope"),
    ("method.name=nosuch", "method.name"),
    ("data.setting=online", "data.setting"),
    ("memory.per_class=5", "memory.per_class"),  # the preset also sets memory.size
    ("train.schedule=multistep", "train.milestones"),
    ("data.augment.label_smoothing=1.5", "data.augment.label_smoothing"),
    ("train.first_task_epochs=-3", "train.first_task_epochs"),
    ("train.first_task_epochs=0", "train.first_task_epochs"),
    ("eval.top_k=0", "eval.top_k"),
    ("data.image_size=0", "data.image_size"),
    ("run.threads=0", "run.threads"),
    ("data.train_per_class=0", "data.train_per_class"),
    ("train.max_batches=0", "train.max_batches"),
    ("train.eval_every=-1", "train.eval_every"),
    ("data.augment.randaugment=rand-m9-foo", "data.augment.randaugment"),
    ("data.augment.randaugment=m9-mstd0.5", "data.augment.randaugment"),
    ("data.augment.randaugment_interpolation=nearest", "data.augment.randaugment_interpolation"),
])
def test_bad_values_name_their_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(["replay/digits-b0inc2"], [override])
    assert str(err.value).startswith(key)


def test_null_keeps_the_default_of_an_optional_setting():
    cfg, _ = load_config(["replay/digits-b0inc2"], ["train.first_task_epochs=null", "run.threads=null"])
    assert cfg.train.first_task_epochs is None and cfg.run.threads is None


def test_switching_model_replaces_its_section():
    cfg, _ = load_config(["replay/digits-b0inc2"], ["model.name=resnet32"])
    assert cfg.model.name == "resnet32" and cfg.model.width == 16


def test_override_syntax_error():
    with pytest.raises(ConfigError):
        parse_override("train.epochs")


def test_unknown_top_level_section():
    with pytest.raises(ConfigError, match="^trian: unknown key"):
        from_dict({"trian": {}})


def test_other_toolboxes_key_names_point_to_ours():
    with pytest.raises(ConfigError, match=r"^model\.weights: unknown key; vitcl calls it model\.pretrained"):
        from_dict({"model": {"weights": "vit.pth"}})
    with pytest.raises(ConfigError, match=r"^train\.init_lr: unknown key; vitcl calls it train\.lr"):
        from_dict({"train": {"init_lr": 0.1}})
    # a synonym whose key this section lacks gets the plain message
    with pytest.raises(ConfigError, match=r"^data\.weights: unknown key; expected one of"):
        from_dict({"data": {"weights": 1}})
    # Mammoth's names, in the sections and the method options
    with pytest.raises(ConfigError, match=r"^memory\.buffer_size: unknown key; vitcl calls it memory\.size"):
        from_dict({"memory": {"buffer_size": 200}})
    with pytest.raises(ConfigError, match=r"^train\.n_epochs: unknown key; vitcl calls it train\.epochs"):
        from_dict({"train": {"n_epochs": 5}})
    with pytest.raises(ConfigError, match=r"^method\.minibatch_size: unknown key; vitcl calls it method\.memory_batch"):
        load_config(["er/digits-b0inc2"], ["method.minibatch_size=32"])


def test_a_misspelt_key_gets_the_closest_name():
    with pytest.raises(ConfigError, match=r"^train\.epoch: unknown key; did you mean train\.epochs\? \(expected"):
        from_dict({"train": {"epoch": 5}})
    with pytest.raises(ConfigError, match=r"^trian: unknown key; did you mean train\?"):
        from_dict({"trian": {}})
    with pytest.raises(ConfigError, match=r"^train\.zzz: unknown key; expected one of"):  # nothing close
        from_dict({"train": {"zzz": 5}})


def test_a_misspelt_name_gets_the_closest_registered_one():
    for override, message in (
            ("method.name=dytx", r"^method\.name: unknown method 'dytx'; did you mean 'dytox'\? expected one of: "),
            ("model.name=resnt18", r"^model\.name: unknown model 'resnt18'; did you mean 'resnet18'\?"),
            ("data.dataset=cifar-100", r"^data\.dataset: unknown dataset 'cifar-100'; did you mean 'cifar100'\?"),
            ("data.datasets=[digits,fashon-mnist]", r"^data\.datasets\[1\]: unknown dataset 'fashon-mnist'; did you "
                                                   r"mean 'fashion-mnist'\?"),
            ("data.class_order=cifar100-ordr2", r"unknown order 'cifar100-ordr2'; did you mean 'cifar100-order2'\?"),
            ("method.name=xyz", r"^method\.name: unknown method 'xyz'; expected one of: ")):  # nothing close
        with pytest.raises(ConfigError, match=message):  # found with the config, before any file is read
            load_config(["replay/digits-b0inc2"], [override])


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config([str(tmp_path / "none.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config([str(bad)])


def test_duplicate_yaml_keys_name_their_line(tmp_path):
    f = tmp_path / "dup.yaml"
    f.write_text("train:\n  epochs: 3\n  lr: 0.1\n  epochs: 5\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: line 4 invalid YAML \(duplicate key 'epochs' \(first on line 2\)"):
        load_config([str(f)])


def test_an_override_without_a_value_is_named_as_such():
    with pytest.raises(ConfigError, match="train.epochs: looks like an override without a value"):
        load_config(["replay/digits-b0inc2", "train.epochs"])


@pytest.mark.parametrize("name", ["../../x", "a/b", "..", ""])
def test_run_name_stays_inside_out_dir(name):
    with pytest.raises(ConfigError, match="^run.name: expected a folder name inside run.out_dir"):
        load_config(["replay/digits-b0inc2"], [f"run.name='{name}'"])
