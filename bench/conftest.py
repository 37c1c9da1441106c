import sys
from pathlib import Path

# bench/ is a folder of scripts, not a package: make its helpers importable
sys.path.insert(0, str(Path(__file__).parent))


def pytest_benchmark_update_machine_info(config, machine_info):
    """Name the GPU in the JSON, so the ratio tables say where they came from."""
    try:
        import torch

        if torch.cuda.is_available():
            machine_info["gpu"] = f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    except Exception:  # noqa: BLE001 - machine info is best effort
        pass
