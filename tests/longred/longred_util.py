"""Shared helpers of the LongReD tests (a module of its own: several test folders have a
``conftest``, so ``from conftest import ...`` picks whichever was imported first)."""


def data_overrides(prefix) -> list:
    return [f"data.data_path={prefix}", f"data.tokenizer_model={prefix}.tokenizer.model",
            f"longred.short_data_path={prefix}", f"longred.s2l_data_path={prefix}"]
