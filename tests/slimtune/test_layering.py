"""The core imports no algorithm package; `import slimtune` alone can load and run."""

import subprocess
import sys

CORE = ["artifact", "assets", "data", "errors", "export", "models", "progress", "recipe", "registry", "stage", "tasks"]


def test_core_modules_import_no_algorithm_package():
    code = (
        "import sys\n"
        + "".join(f"import slimtune.{m}\n" for m in CORE)
        + "bad = [m for m in sys.modules if m.split('.')[:2] in "
        "(['slimtune','distributed'],['slimtune','eval'],['slimtune','compress'],['slimtune','delta'],['slimtune','prompt'])]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_plain_import_finds_every_stage():
    code = "import slimtune\nfrom slimtune.registry import get_stage\nfor s in ('finetune', 'evaluate', 'export'): get_stage(s)\n"
    subprocess.run([sys.executable, "-c", code], check=True)
