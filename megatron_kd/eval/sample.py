"""One evaluation prompt with its references, the unit every task produces and the runner scores."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class Sample:
    task: str
    length: int  # target length: prompt tokens + tokens_to_generate <= length
    index: int
    input: str  # the whole prompt, answer prefix included (generation continues it)
    outputs: List[str]  # references
    metric: str  # "all" (RULER string_match_all) | "part" (string_match_part)
    tokens_to_generate: int
    #: character offsets in ``input`` of the needles whose values are asked for (niah tasks);
    #: the runner turns them into token distances to the end of the prompt
    needle_chars: List[int] = field(default_factory=list)
    depth: Optional[float] = None  # needle depth in % of the haystack (NIAH grid)
    meta: dict = field(default_factory=dict)
