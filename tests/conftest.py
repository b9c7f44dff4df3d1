import os

# Fixed thread counts, so CPU float reductions run in the same order however busy the machine
# is (the resume tests compare textures byte for byte). Set before torch is imported.
os.environ.setdefault("MKL_DYNAMIC", "FALSE")
os.environ.setdefault("OMP_DYNAMIC", "FALSE")

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def psd3d_home(tmp_path_factory):
    """One PSD3D_HOME for the whole session: the tiny models are built once (about 10 s)."""
    home = os.environ.get("PSD3D_TEST_HOME") or str(tmp_path_factory.mktemp("psd3d_home"))
    os.environ["PSD3D_HOME"] = home
    return home


@pytest.fixture(scope="session")
def tiny(psd3d_home):
    """The tiny preset's models, loaded through the real loading path."""
    from backend.models import load_models, quiet_libraries
    from backend.pipelines.presets import TINY_MODELS

    quiet_libraries()
    return load_models(TINY_MODELS, device=torch.device("cpu"), dtype=torch.float32)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def stop_after():
    """A factory of ``should_stop`` callables that say stop from their (n+1)-th poll: a Stop & Keep
    that lands after n optimisation steps of a pipeline."""
    def make(n_polls: int):
        count = {"n": 0}

        def should_stop():
            count["n"] += 1
            return count["n"] > n_polls
        return should_stop
    return make


@pytest.fixture
def serve_process():
    """A factory that starts ``psd3d serve --data DATA [args]`` in its own process on an ephemeral
    loopback port: ``start(data, *args, env=None) -> (process, endpoint)``, once it listens. Its stderr
    is drained on a thread (a full pipe would block the server); any process left is killed at the end."""
    import subprocess
    import sys
    import threading

    started = []

    def start(data, *args: str, env: dict | None = None):
        proc = subprocess.Popen([sys.executable, "-m", "backend.cli", "serve", "--bind", "tcp://127.0.0.1:*",
                                 "--data", str(data), *args], stderr=subprocess.PIPE, text=True, env=env)
        started.append(proc)
        line = proc.stderr.readline()
        assert "listening on" in line, line
        threading.Thread(target=proc.stderr.read, daemon=True).start()
        return proc, line.split("listening on ")[1].split(",")[0]

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
