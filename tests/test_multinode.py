"""A Ray cluster of two simulated nodes (ray.cluster_utils.Cluster) with shared local storage
trains one small stage, one worker per node. (Two real machines cannot exist here; the
simulated nodes are separate raylets with their own resources, which is what Ray schedules on.)"""

from pathlib import Path

import pytest

from ganforge.tasks.checkpoint import load_state
from ganforge.tasks.params import Params
from ganforge.tasks.train import train

pytestmark = pytest.mark.slow


def test_one_stage_on_two_simulated_nodes(digits_shards, tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"node_a": 1}})
    cluster.add_node(num_cpus=1, resources={"node_b": 1})
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        p = Params.model_validate({
            "train": dict(out=str(tmp_path / "run"), resolution=4, workers=2, batch_size=16, checkpoint_kimg=0.08,
                          ema_half_life_kimg=0.1, progan=dict(fmap_max=16, fmap_base=64, latent_dim=16,
                                                              stabilize_kimg=0.08)),
            "runtime": {"ray_storage": str(tmp_path / "shared")},
        })
        s = train(digits_shards, p.train.out, p)
        final = s["final_checkpoint"]
        assert final.startswith(str(tmp_path / "shared"))
        assert load_state(final)["images_in_stage"] == 80
        assert (Path(p.train.out) / "samples" / "progan-r0004-0000.080kimg.png").exists()
    finally:
        ray.shutdown()
        cluster.shutdown()
