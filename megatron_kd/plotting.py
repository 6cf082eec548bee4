"""matplotlib with the file-only Agg backend: every figure here is written to disk, often on a
headless node, so no module should pick a backend of its own."""


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
