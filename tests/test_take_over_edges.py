"""Take-over edges an audit found: a router that stopped in the middle of a scale-down whose
role's other instance then broke, and one that stopped while its role's only instance was
being replaced. The next router keeps the warm draining instance, and starts an instance for
a role that has none, instead of serving without it."""

from __future__ import annotations

import dataclasses
import signal
import time
import uuid

import pytest

from tests.test_deployment import _down, _greedy, _pids, _Serve

pytestmark = pytest.mark.timeout(300)


def test_a_take_over_keeps_a_draining_last_instance_and_restores_a_missing_role(
    ray_session, tiny_model_dir
):
    import ray

    from orchestrator import deployment as dep

    gcs = ray.get_runtime_context().gcs_address
    name = f"t-{uuid.uuid4().hex[:8]}"
    routers: list[_Serve] = []
    try:
        routers.append(_Serve(gcs, tiny_model_dir, name))
        url = routers[-1].wait_serving()
        want, pids = _greedy(url), _pids(url)
        routers[-1].stop(signal.SIGKILL)

        # It was being scaled down, from two instances to one, and the one to stay broke
        # since (its actors and placement group are gone).
        record = dep.load(name)
        assert record is not None and len(record.instances) == 1
        (inst,) = record.instances
        staying = dataclasses.replace(inst, instance=5)
        record.instances = [dataclasses.replace(inst, draining=True), staying]
        dep.save(record)
        routers.append(_Serve(gcs, tiny_model_dir, name))
        url = routers[-1].wait_serving()
        assert "its role has no other working instance; it serves on" in routers[-1].log
        assert _pids(url) == pids and _greedy(url) == want  # the warm one, not a new one
        record = dep.load(name)
        assert record is not None and [i.name for i in record.instances] == [inst.name]
        routers[-1].stop(signal.SIGKILL)

        # Its only instance died for good and left the record; its replacement had not
        # started when the router stopped.
        record = dep.load(name)
        assert record is not None
        (inst,) = record.instances
        assert not inst.draining  # (taken over as serving)
        ray.kill(ray.get_actor(f"{name}/{inst.name}/rank-0", namespace=dep.NAMESPACE))
        record.instances, record.replacing = [], [inst.name]
        dep.save(record)
        time.sleep(1)
        routers.append(_Serve(gcs, tiny_model_dir, name))
        url = routers[-1].wait_serving()
        assert "no colocated instance is left; starting one" in routers[-1].log
        assert _pids(url) != pids and _greedy(url) == want
        record = dep.load(name)
        assert record is not None and [i.role for i in record.instances] == ["colocated"]
    finally:
        for r in routers:
            if r.proc.poll() is None:
                r.stop(signal.SIGKILL)
        _down(gcs, "--deployment", name, "--force")
