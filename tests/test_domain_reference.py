"""DomainReference: fitted centres and spreads, the capped distance to the nearest source, files."""

from __future__ import annotations

import pytest
import torch

from hf_hyperflow.domain_reference import (
    DOMAIN_REFERENCE_FILE,
    SPREAD_FLOOR,
    Z_SQUARED_CAP,
    DomainReference,
    statistics_vector,
)


def two_sources() -> dict[str, torch.Tensor]:
    """Source a around 0, source b around 10, in F = 4 channels, 50 episodes each."""
    generator = torch.Generator().manual_seed(0)
    return {"a": torch.randn(50, 4, generator=generator, dtype=torch.float64),
            "b": 10 + 2 * torch.randn(50, 4, generator=generator, dtype=torch.float64)}


def test_fit_holds_each_sources_mean_and_floored_spread():
    statistics = two_sources()
    reference = DomainReference.fit(statistics)
    pooled = torch.cat([statistics["a"], statistics["b"]]).float().std(0)
    assert reference.sources == ["a", "b"] and reference.episodes == 50
    torch.testing.assert_close(reference.centres[1], statistics["b"].float().mean(0))
    torch.testing.assert_close(reference.spreads[0], statistics["a"].float().std(0) + SPREAD_FLOOR * pooled + 1e-6)


def test_distance_is_the_mean_capped_squared_z_score_to_the_nearest_source():
    reference = DomainReference(["a", "b"], torch.tensor([[0.0, 0.0], [10.0, 10.0]]),
                                torch.tensor([[1.0, 1.0], [2.0, 2.0]]), episodes=2)
    vectors = torch.tensor([[0.0, 0.0],      # at a's centre
                            [1.0, 2.0],      # near a: (1 + 4) / 2
                            [12.0, 10.0],    # near b: ((2 / 2)^2 + 0) / 2
                            [0.0, 100.0],    # one channel far off from both: capped
                            [500.0, -500.0]])  # far from everything: every channel capped
    expected = torch.tensor([0.0, 2.5, 0.5, Z_SQUARED_CAP / 2, Z_SQUARED_CAP])
    torch.testing.assert_close(reference.distance(vectors), expected)


def test_distance_of_another_size_says_so():
    reference = DomainReference.fit(two_sources())
    with pytest.raises(ValueError, match=r"shape \[T, 4\].*another adapter or backbone"):
        reference.distance(torch.zeros(2, 5))


@pytest.mark.parametrize(("statistics", "message"), [
    ({}, "at least one training source"),
    ({"a": torch.zeros(1, 3)}, "episodes >= 2"),
    ({"a": torch.zeros(4, 3), "b": torch.zeros(4, 2)}, "one common F"),
    ({"a": torch.tensor([[0.0, float("nan")], [1.0, 1.0]])}, "NaN or inf"),
])
def test_fit_refuses_what_cannot_make_a_reference(statistics, message):
    with pytest.raises(ValueError, match=message):
        DomainReference.fit(statistics)


def test_statistics_vector_puts_modules_side_by_side_in_the_given_order():
    statistics = {"m1": torch.ones(2, 3), "m0": torch.zeros(2, 6)}
    vectors = statistics_vector(statistics, ["m0", "m1"])
    assert vectors.shape == (2, 9)
    assert vectors[:, :6].eq(0).all() and vectors[:, 6:].eq(1).all()


def test_save_and_load(tmp_path):
    reference = DomainReference.fit(two_sources())
    reference.save(tmp_path / DOMAIN_REFERENCE_FILE)
    loaded = DomainReference.load_if_present(tmp_path)
    assert loaded.sources == reference.sources and loaded.episodes == reference.episodes
    torch.testing.assert_close(loaded.centres, reference.centres, rtol=0, atol=0)
    torch.testing.assert_close(loaded.spreads, reference.spreads, rtol=0, atol=0)
    assert DomainReference.load_if_present(tmp_path / "elsewhere") is None


def test_a_damaged_or_foreign_file_is_refused(tmp_path):
    from hf_hyperflow.io import save_safetensors

    path = tmp_path / DOMAIN_REFERENCE_FILE
    DomainReference.fit(two_sources()).save(path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # a flipped bit in the tensors
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="damaged"):
        DomainReference.load(path)
    save_safetensors({"centres": torch.zeros(2, 3)}, path)
    with pytest.raises(ValueError, match="not a domain reference"):
        DomainReference.load(path)


def test_a_reference_of_another_backbone_is_refused(tmp_path):
    reference = DomainReference.fit(two_sources(), backbone_fingerprint="aaaa")
    reference.save(tmp_path / DOMAIN_REFERENCE_FILE)
    assert DomainReference.load_if_present(tmp_path, "aaaa").backbone_fingerprint == "aaaa"
    with pytest.raises(ValueError, match=r"another backbone \(fingerprint aaaa\) than the adapter's \(bbbb\)"):
        DomainReference.load_if_present(tmp_path, "bbbb")
