"""Recording, storing, resuming and interpolating fine-tuning trajectories (tiny random ViT, synthetic episodes)."""

from __future__ import annotations

import json
import warnings
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel

from hf_hyperflow import HyperFlowAdapter, HyperFlowConfig
from hf_hyperflow.finetune import finetune, initial_state
from hf_hyperflow.state import TaskState
from hf_hyperflow.trajectories import (
    TrajectoryStore,
    _derived_seed,
    _shard_records,
    flatten_state,
    record_trajectories,
    snapshot_steps,
    trajectory_path,
    unflatten_state,
)

IMAGE = 32
STEPS = 4




@pytest.fixture(scope="module")
def adapter():
    torch.manual_seed(0)
    config = AutoConfig.for_model("vit", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, image_size=IMAGE, patch_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return HyperFlowAdapter(AutoModel.from_config(config), HyperFlowConfig(r=2, first_adapted_block=-1))


def make_episodes(count: int, ways: int = 3, shots: int = 2):
    episodes = []
    for i in range(count):
        generator = torch.Generator().manual_seed(100 + i)
        ways_i = ways + (i % 2)  # different numbers of classes, as variable-way episodes have
        episodes.append(SimpleNamespace(
            support_images=torch.randn(ways_i * shots, 3, IMAGE, IMAGE, generator=generator),
            support_labels=torch.arange(ways_i).repeat(shots),
            classes=[f"class{c}" for c in range(ways_i)],
            spec={"dataset": "synthetic", "split": "train", "seed": 7, "index": i, "ways": ways_i, "shots": shots},
        ))
    return episodes


RUN = dict(groups=("lora", "shift", "head"), steps=STEPS, lr=1e-2, shard_size=2)


def read_folder(folder):
    """Every shard's tensors and records (seconds dropped: wall-clock time differs between runs), and the indexes."""
    tensors, records = {}, {}
    for path in sorted((folder / "shards").iterdir()):
        tensors[path.name] = load_file(str(path))
        records[path.name] = [{k: v for k, v in r.items() if k != "seconds"} for r in _shard_records(path)]
    indexes = {p.name: json.loads(p.read_text()) for p in sorted(folder.glob("index-*.json"))}
    return tensors, records, indexes


def assert_same_folders(a, b):
    tensors_a, records_a, index_a = read_folder(a)
    tensors_b, records_b, index_b = read_folder(b)
    assert sorted(tensors_a) == sorted(tensors_b)
    for name in tensors_a:
        assert tensors_a[name].keys() == tensors_b[name].keys()
        for key in tensors_a[name]:
            assert torch.equal(tensors_a[name][key], tensors_b[name][key]), (name, key)
    assert records_a == records_b
    assert index_a == index_b
    assert json.loads((a / "store.json").read_text()) == json.loads((b / "store.json").read_text())


# ------------------------------------------------------------------------------------------------
def test_recorded_trajectories_are_the_finetuning_trajectories(adapter, tmp_path):
    episodes = make_episodes(3)
    written = record_trajectories(adapter, episodes, tmp_path / "store", **RUN)
    assert written == ["0:0", "1:0", "2:0"]
    store = TrajectoryStore(tmp_path / "store")
    assert len(store) == 3 and store.ids == written
    assert sorted(p.name for p in (tmp_path / "store" / "shards").iterdir()) == [
        "r000-000000.safetensors", "r000-000001.safetensors"]
    for i, episode in enumerate(episodes):
        spec, snapshots, meta = store[i]
        assert spec == episode.spec
        assert meta["classes"] == episode.classes and meta["episode"] == i and meta["init"] == 0
        expected = finetune(adapter, episode.support_images, episode.support_labels, groups=RUN["groups"],
                            steps=STEPS, lr=1e-2, seed=_derived_seed(0, i, 0), record_trajectory=True)
        assert set(snapshots) == set(expected.trajectory)
        for key in snapshots:
            assert torch.equal(snapshots[key], expected.trajectory[key]), key
        assert meta["losses"] == expected.losses
        assert snapshots["head.prototypes:"].shape == (STEPS + 1, len(episode.classes), 32)
    table = store.metadata()
    assert table["id"] == written and table["ways"] == [3, 4, 3]
    assert json.loads(table["spec"][1]) == episodes[1].spec


def test_killed_and_resumed_run_equals_uninterrupted_run(adapter, tmp_path):
    episodes = make_episodes(5)
    record_trajectories(adapter, episodes, tmp_path / "whole", **RUN)

    seen = []

    def die_after_three(record):
        seen.append(record["id"])
        if len(seen) == 4:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        record_trajectories(adapter, episodes, tmp_path / "resumed", callback=die_after_three, **RUN)
    # one whole shard committed; the half-done one and the unfinished trajectory are not on disk
    assert len(TrajectoryStore(tmp_path / "resumed")) == 2
    # a shard caught mid-write leaves only a temporary file: it is not read, and resuming removes it
    stale = tmp_path / "resumed" / "shards" / ".r000-000001.safetensors.tmp-999"
    stale.write_bytes(b"partial")
    assert len(TrajectoryStore(tmp_path / "resumed")) == 2
    with pytest.raises(ValueError, match="already holds a trajectory store: pass resume=True"):
        record_trajectories(adapter, episodes, tmp_path / "resumed", **RUN)
    written = record_trajectories(adapter, episodes, tmp_path / "resumed", resume=True, **RUN)
    assert written == ["2:0", "3:0", "4:0"]
    assert not stale.exists()
    assert_same_folders(tmp_path / "whole", tmp_path / "resumed")
    # resuming a finished store does nothing
    assert record_trajectories(adapter, episodes, tmp_path / "resumed", resume=True, **RUN) == []
    assert_same_folders(tmp_path / "whole", tmp_path / "resumed")


def test_store_is_appendable(adapter, tmp_path):
    episodes = make_episodes(4)
    record_trajectories(adapter, episodes[:2], tmp_path / "store", **RUN)
    assert record_trajectories(adapter, episodes, tmp_path / "store", resume=True, **RUN) == ["2:0", "3:0"]
    assert TrajectoryStore(tmp_path / "store").ids == ["0:0", "1:0", "2:0", "3:0"]


def test_resume_with_other_settings_is_refused(adapter, tmp_path):
    episodes = make_episodes(1)
    record_trajectories(adapter, episodes, tmp_path / "store", **RUN)
    with pytest.raises(ValueError, match=r"other settings.*settings.lr: stored 0.01, now 0.001"):
        record_trajectories(adapter, episodes, tmp_path / "store", resume=True, **dict(RUN, lr=1e-3))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty and holds no trajectory store"):
        record_trajectories(adapter, episodes, tmp_path / "other", **RUN)


def test_ranks_split_the_episodes(adapter, tmp_path):
    episodes = make_episodes(5)
    record_trajectories(adapter, episodes, tmp_path / "one", **RUN)
    assert record_trajectories(adapter, episodes, tmp_path / "two", rank=0, world_size=2, **RUN) == ["0:0", "2:0", "4:0"]
    # a second process started by hand joins the existing store with resume=True
    assert record_trajectories(adapter, episodes, tmp_path / "two", rank=1, world_size=2, resume=True,
                               **RUN) == ["1:0", "3:0"]
    one, two = TrajectoryStore(tmp_path / "one"), TrajectoryStore(tmp_path / "two")
    assert sorted(two.ids) == sorted(one.ids)
    for trajectory_id in one.ids:
        a, b = one[one.index_of(trajectory_id)], two[two.index_of(trajectory_id)]
        assert a.spec == b.spec
        for key in a.snapshots:
            assert torch.equal(a.snapshots[key], b.snapshots[key])
    assert sorted(p.name for p in (tmp_path / "two").glob("index-*.json")) == ["index-r000.json", "index-r001.json"]
    index = json.loads((tmp_path / "two" / "index-r001.json").read_text())
    assert index == {"rank": 1, "shards": [{"file": "r001-000000.safetensors", "ids": ["1:0", "3:0"]}]}
    with pytest.raises(KeyError, match="No trajectory '9:0'"):
        one.index_of("9:0")


def test_noisy_initialisations_and_chosen_groups(adapter, tmp_path):
    episodes = make_episodes(1)
    record_trajectories(adapter, episodes, tmp_path / "store", groups=("shift",), steps=STEPS, lr=1e-2, inits=3,
                        noise_std=0.05)
    store = TrajectoryStore(tmp_path / "store")
    assert store.ids == ["0:0", "0:1", "0:2"]
    theta0 = initial_state(adapter, 3)
    first = [store[i].snapshots for i in range(3)]
    assert all(set(s) == {k for k in theta0 if k.startswith("shift.")} for s in first)
    for key in first[0]:
        assert torch.equal(first[0][key][0], theta0[key][0])
    noise = torch.cat([(first[1][key][0] - theta0[key][0]).flatten() for key in first[1]])
    assert 0.03 < float(noise.std()) < 0.07
    other = torch.cat([(first[2][key][0] - theta0[key][0]).flatten() for key in first[2]])
    assert not torch.allclose(noise, other)


def test_snapshot_subsampling_and_dtype(adapter, tmp_path):
    assert snapshot_steps(5, 2) == [0, 2, 4, 5]
    assert snapshot_steps(4, 2) == [0, 2, 4]
    episodes = make_episodes(1)
    record_trajectories(adapter, episodes, tmp_path / "store", groups=("lora", "head"), steps=5, lr=1e-2,
                        snapshot_every=2, dtype="bfloat16")
    store = TrajectoryStore(tmp_path / "store")
    torch.testing.assert_close(store.times(), torch.tensor([0.0, 0.4, 0.8, 1.0], dtype=torch.float64))
    _, snapshots, _ = store[0]
    full = finetune(adapter, episodes[0].support_images, episodes[0].support_labels, groups=("lora", "head"),
                    steps=5, lr=1e-2, seed=_derived_seed(0, 0, 0), record_trajectory=True).trajectory
    for key in snapshots:
        assert snapshots[key].dtype == torch.bfloat16
        assert torch.equal(snapshots[key], full[key][[0, 2, 4, 5]].to(torch.bfloat16))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"groups": ("full",)}, "not 'full'"),
        ({"dtype": "int8"}, "not a storage dtype"),
        ({"inits": 0}, "inits must be an integer >= 1"),
        ({"snapshot_every": 0}, "snapshot_every must be an integer >= 1"),
        ({"rank": 2, "world_size": 2}, "Need 0 <= rank < world_size"),
        ({"noise_std": -1.0}, "noise_std must be a number >= 0.0"),
    ],
)
def test_bad_recording_arguments(adapter, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        record_trajectories(adapter, make_episodes(1), tmp_path / "store", **{**RUN, **kwargs})
    assert not (tmp_path / "store").exists()


def test_store_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="store.json is missing"):
        TrajectoryStore(tmp_path)
    (tmp_path / "store.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="is not a hf-hyperflow-trajectories header"):
        TrajectoryStore(tmp_path)


# ------------------------------------------------------------------------------------------------
# Paths
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["piecewise", "cubic"])
def test_stored_trajectory_path_passes_through_the_snapshots(adapter, tmp_path, kind):
    record_trajectories(adapter, make_episodes(1), tmp_path / "store", steps=6, lr=1e-2, snapshot_every=2)
    store = TrajectoryStore(tmp_path / "store")
    _, snapshots, _ = store[0]
    path = store.path_for(0, kind, dtype=torch.float64)
    times = store.times()
    for k, t in enumerate(times.tolist()):
        position = path.position(t)
        for key in snapshots:
            torch.testing.assert_close(position[key][0], snapshots[key][k].double(), rtol=0, atol=1e-12)
    # velocity = derivative of position (central differences inside a segment)
    t, h = 0.55, 1e-6
    numeric = (flatten_state(path.position(t + h))[0] - flatten_state(path.position(t - h))[0]) / (2 * h)
    torch.testing.assert_close(flatten_state(path.velocity(t))[0], numeric, rtol=1e-5, atol=1e-7)


def test_linear_path_goes_from_first_to_last_snapshot(adapter, tmp_path):
    record_trajectories(adapter, make_episodes(1), tmp_path / "store", steps=4, lr=1e-2)
    store = TrajectoryStore(tmp_path / "store")
    _, snapshots, _ = store[0]
    path = store.path_for(0, "linear")
    velocity = path.velocity(0.3)
    for key in snapshots:
        torch.testing.assert_close(path.position(0.0)[key][0], snapshots[key][0])
        torch.testing.assert_close(path.position(1.0)[key][0], snapshots[key][-1])
        torch.testing.assert_close(velocity[key][0], snapshots[key][-1] - snapshots[key][0])


def test_flatten_roundtrip_and_batched_paths():
    generator = torch.Generator().manual_seed(0)
    a = TaskState({"lora.A:m": torch.randn(5, 2, 3, generator=generator),
                   "head.prototypes:": torch.randn(5, 4, 6, generator=generator)})
    b = a.map(lambda t: t * 2)
    flat, layout = flatten_state(a)
    assert flat.shape == (5, 2 * 3 + 4 * 6)
    back = unflatten_state(flat, layout)
    assert all(torch.equal(back[k], a[k]) for k in a)
    path = trajectory_path([a, b], "piecewise")
    position = path.position(torch.tensor([0.25, 0.5]))
    assert position.num_tasks == 2
    torch.testing.assert_close(position["lora.A:m"][0], a["lora.A:m"][1])
    torch.testing.assert_close(position["lora.A:m"][1], b["lora.A:m"][2])
    # a straight line: every kind gives the line and its constant velocity
    line = TaskState({"shift.bias:m": torch.linspace(0, 1, 5)[:, None] * torch.tensor([[2.0, -1.0]])})
    for kind in ("linear", "piecewise", "cubic"):
        p = trajectory_path(line, kind)
        torch.testing.assert_close(p.position(0.3)["shift.bias:m"][0], torch.tensor([0.6, -0.3]))
        torch.testing.assert_close(p.velocity(0.7)["shift.bias:m"][0], torch.tensor([2.0, -1.0]))
    with pytest.raises(ValueError, match="different entries or shapes"):
        trajectory_path([a, TaskState({"lora.A:m": a["lora.A:m"], "head.prototypes:": torch.zeros(5, 3, 6)})])
    with pytest.raises(ValueError, match="different numbers of snapshots"):
        trajectory_path([a, a.select(slice(0, 3))])
    with pytest.raises(ValueError, match="unknown interpolation kind 'spline'"):
        trajectory_path(a, "spline")
    with pytest.raises(ValueError, match=r"Expected a tensor \[T, 30\]"):
        unflatten_state(torch.zeros(2, 29), layout)
