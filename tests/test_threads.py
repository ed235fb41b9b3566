"""CPU threads chosen before torch loads (lamda_edge.load.device.configure_cpu_threads)."""

import os
import subprocess
import sys

from lamda_edge.load.device import configure_cpu_threads


def test_the_users_omp_settings_are_kept():
    env = {"OMP_NUM_THREADS": "3", "OMP_WAIT_POLICY": "ACTIVE"}
    assert configure_cpu_threads(env) == 3
    assert env == {"OMP_NUM_THREADS": "3", "OMP_WAIT_POLICY": "ACTIVE"}


def test_unset_means_passive_waits_and_at_most_the_usable_cores():
    env = {}
    threads = configure_cpu_threads(env)
    assert env["OMP_WAIT_POLICY"] == "PASSIVE" and env["OMP_NUM_THREADS"] == str(threads)
    assert threads == len(os.sched_getaffinity(0))


def test_a_compute_command_sets_them_before_torch_loads(tmp_path):
    """`lamda-edge generate` (failing fast on a missing folder) has set OMP_* by the time torch could load."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}
    code = ("import os, sys; from lamda_edge import cli; rc = cli.main(['generate', '--model', sys.argv[1], "
            "'--prompt', 'x']); print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('OMP_NUM_THREADS'), rc)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "missing")], env=env, capture_output=True,
                         text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    policy, threads, rc = out.stdout.split()
    assert policy == "PASSIVE" and int(threads) >= 1 and rc == "2", out.stderr


def test_onnx_runtime_threads_sleep_under_a_passive_wait_policy(tmp_path, monkeypatch):
    """ONNX Runtime's pool spins between ops unless told not to: sessions follow OMP_WAIT_POLICY=PASSIVE."""
    import onnx
    from onnx import TensorProto, helper

    from lamda_edge.runtime.session import session, spinning_allowed

    assert not spinning_allowed({"OMP_WAIT_POLICY": "passive"})
    assert spinning_allowed({"OMP_WAIT_POLICY": "ACTIVE"}) and spinning_allowed({})
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    onnx.save(helper.make_model(graph), tmp_path / "relu.onnx")
    for policy, spins in (("PASSIVE", "0"), ("ACTIVE", None)):
        monkeypatch.setenv("OMP_WAIT_POLICY", policy)
        entries = session(tmp_path / "relu.onnx").get_session_options().get_session_config_entry
        try:
            found = entries("session.intra_op.allow_spinning")
        except Exception:  # onnxruntime raises when the entry was never set
            found = None
        assert found == spins, policy
