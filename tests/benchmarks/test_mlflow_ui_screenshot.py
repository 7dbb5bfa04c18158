"""The screenshot script's store argument: a finished sweep's folder, its mlflow.db, or a URI; a path that
is not there ends in one line. (Taking the screenshots needs chromium and a finished sweep: not run here.)"""
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "mlflow_ui_screenshot.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("mlflow_ui_screenshot", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_store_argument_as_folder_file_or_uri(script, tmp_path):
    (tmp_path / "mlflow.db").write_bytes(b"")
    expected = f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}"
    assert script.store_uri(str(tmp_path)) == expected == script.store_uri(str(tmp_path / "mlflow.db"))
    assert script.store_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    with pytest.raises(SystemExit, match="--tracking-uri .*: no MLflow SQLite store there"):
        script.store_uri(str(tmp_path / "elsewhere"))
