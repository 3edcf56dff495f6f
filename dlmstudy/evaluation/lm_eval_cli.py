"""lm_eval's own command line with both dlmstudy arms registered: `dlmstudy-lm-eval` (or
`python -m dlmstudy.evaluation.lm_eval_cli`), every lm_eval flag as lm_eval has it.

lm_eval 0.4.x finds a model outside its own tree only through `register_model`, which runs when the
model's module is imported: the `lm_eval` command never imports dlmstudy, so it cannot see our models.
This module imports them first and then hands the command line to lm_eval, as dllm's `eval.py` does
for its LLaDA model; `--model` then takes dlmstudy, llada / dlmstudy_mdm and dlmstudy_ar.
"""

from __future__ import annotations

import sys

from dlmstudy.errors import UserError


def main() -> int:
    """Run lm_eval's CLI on sys.argv; a dlmstudy UserError (a bad model argument, a wrong arm) is one line, exit 2."""
    import dlmstudy.evaluation.lm_eval_models  # noqa: F401  (registers the models)
    from lm_eval.__main__ import cli_evaluate

    try:
        cli_evaluate()
    except UserError as err:
        print(f"dlmstudy: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
