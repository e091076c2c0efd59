"""Share of a dataset's 5-way 5-shot support sets (all classes, the benchmark's seeded episodes) that each adapter's
domain gate keeps at direct transfer, and their distances to the training sources: a diagnostic of a test result.

    python benchmarks/validation_runs/e11_four_blocks/two_points/test_gate_share/gated_share.py digits 100 \
        e10=<adapter folder> e11b=<adapter folder>
"""

import sys

import torch
from transformers import AutoModel

from hf_hyperflow import HyperFlowAdapter
from hf_hyperflow.episodes import EpisodeSampler, load_image_dataset

torch.set_num_threads(1)
name, episodes = sys.argv[1], int(sys.argv[2])
sampler = EpisodeSampler(load_image_dataset(f"data/{name}"), protocol="fixed", ways=5, shots=5, queries=15,
                         split=None, num_episodes=episodes, seed=0)
for label, folder in (arg.split("=", 1) for arg in sys.argv[3:]):
    adapter = HyperFlowAdapter.from_pretrained(AutoModel.from_pretrained("models/efficientnet-lite0").eval(), folder)
    distances, times = [], []
    for i in range(episodes):
        episode = sampler[i]
        task = adapter.adapt(adapter.pixel_values(episode.support_images), torch.as_tensor(episode.support_labels))
        distances.append(float(task.domain_distance))
        times.append(float(task.integration_time))
    d, t = torch.tensor(distances), torch.tensor(times)
    print(f"{name} {label}: gated {(d > adapter.config.domain_gate).float().mean():.2f}, "
          f"kept at t=0 {(t == 0).float().mean():.2f}, distance median {d.median():.2f} "
          f"(10-90%: {d.quantile(0.1):.2f}-{d.quantile(0.9):.2f})", flush=True)
