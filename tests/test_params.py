from pathlib import Path

import pytest

from ganforge.tasks.params import Params, ParamsError, load_params, parse_override

ROOT = Path(__file__).resolve().parents[1]


def test_repo_params_yaml_is_valid():
    p = load_params(ROOT / "params.yaml")
    assert p.data.resolution == 32
    assert p.train.family == "progan"
    assert p.runtime.mlflow_tracking_uri.startswith("sqlite:")


def test_defaults_without_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_params() == Params()


def test_missing_params_file_is_named(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "override, key, words",
    [
        ("data.resolution=48", "data.resolution", "power of two"),
        ("data.shard_size=-3", "data.shard_size", "greater than or equal to 1"),
        ("train.family=stylegan9", "train.family", "progan"),
        ("data.colour=red", "data.colour", "unknown key"),
        ("train.progan.lr=0", "train.progan.lr", "greater than 0"),
        ("eval.metrics=[fid,bogus]", "eval.metrics.1", "'fid', 'kid', 'intra_fid', 'is'"),  # + metrics of plugins
        ("train.progan.betas=[0.5,1.5]", "train.progan.betas", "[0, 1)"),
    ],
)
def test_invalid_values_name_key_and_allowed(tmp_path, override, key, words):
    with pytest.raises(ParamsError) as e:
        load_params(ROOT / "params.yaml", [override])
    msg = str(e.value)
    assert key in msg and words in msg, msg


def test_stage_resolution_consistency():
    with pytest.raises(ParamsError, match="start_resolution"):
        load_params(ROOT / "params.yaml", ["train.resolution=8", "train.progan.start_resolution=16"])


def test_overrides_are_typed():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a.b=0.5") == ("a.b", 0.5)
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    assert parse_override("a=true") == ("a", True)
    with pytest.raises(ParamsError, match="key.path=value"):
        parse_override("novalue")
    p = load_params(ROOT / "params.yaml", ["train.progan.lr=0.002", "data.source=synthetic:shapes:64"])
    assert p.train.progan.lr == 0.002 and p.data.source == "synthetic:shapes:64"


def test_yaml_not_a_mapping(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("- 1\n- 2\n")
    with pytest.raises(ParamsError, match="mapping"):
        load_params(f)


def test_section_hash_tracks_content():
    a, b = Params(), Params.model_validate({"eval": {"num_samples": 10}})
    assert a.section_hash("data", "train") == b.section_hash("data", "train")
    assert a.section_hash("eval") != b.section_hash("eval")


def test_environment_overrides_sit_between_the_file_and_set(monkeypatch):
    """GANFORGE__SECTION__KEY is how containers and pods get cluster settings (infra/)."""
    from ganforge.tasks.params import ParamsError, load_params

    monkeypatch.setenv("GANFORGE__RUNTIME__RAY_ADDRESS", "ray-head:6379")
    monkeypatch.setenv("GANFORGE__TRAIN__WORKERS", "4")
    p = load_params(None)
    assert p.runtime.ray_address == "ray-head:6379" and p.train.workers == 4
    assert load_params(None, ["train.workers=3"]).train.workers == 3  # --set wins
    monkeypatch.setenv("GANFORGE__TRAIN__BATCH_SIZE", "many")
    with pytest.raises(ParamsError, match=r"GANFORGE__\* environment[\s\S]*train.batch_size"):
        load_params(None)
