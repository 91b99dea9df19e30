"""With seqio and tensorflow installed, training and evaluation still load neither (the main suite's
tests/test_imports.py checks the import statements; this checks sys.modules where the packages exist)."""

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("seqio", reason="the seqio extra is not installed (make test-seqio installs it)")

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("main_test_imports", ROOT / "tests" / "test_imports.py")
main_test_imports = importlib.util.module_from_spec(spec)
spec.loader.exec_module(main_test_imports)


def test_training_and_evaluation_load_no_seqio_or_tensorflow_where_installed():
    assert importlib.util.find_spec("tensorflow") is not None
    main_test_imports.test_training_and_evaluation_modules_load_no_seqio_or_tensorflow()


def test_only_the_interop_package_imports_them():
    main_test_imports.test_only_the_seqio_interop_imports_seqio_or_tensorflow()
