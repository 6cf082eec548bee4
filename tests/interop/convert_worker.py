"""Write tiny random HF models of several families and convert them in one process (one
megatron-core import for all). argv: OUT_DIR FAMILY[:TP] ...  Prints ``RESULT {json}``."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from hf_fixtures import make_hf_model  # noqa: E402


def main():
    out = Path(sys.argv[1])
    summaries = {}
    for spec in sys.argv[2:]:
        family, _, tp = spec.partition(":")
        make_hf_model(family, out / family)
        from megatron_kd.interop.convert import export_hf, import_hf

        summaries[family] = import_hf(out / family, out / f"{family}_mcore", int(tp or 1), progress=False)
        export_hf(out / f"{family}_mcore", out / f"{family}_back", progress=False)
    print("RESULT " + json.dumps(summaries), flush=True)


if __name__ == "__main__":
    main()
