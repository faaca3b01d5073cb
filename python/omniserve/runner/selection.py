"""Whether decode selects pages (LServe dynamic sparsity), and with what sizes.

`selection_from_config` turns the engine options into a `PageSelection` (`formats/page_selection.py`),
rounding the token budget up to whole pages (and saying so), or None where selection is off or
could never leave a page out (the budget covers max_model_len).
"""

from __future__ import annotations

import logging

from omniserve.config import EngineConfig
from omniserve.errors import ConfigError
from omniserve.formats.page_selection import PageSelection

logger = logging.getLogger(__name__)


def selection_from_config(
    config: EngineConfig, sliding_windows: list[int | None], max_model_len: int
) -> PageSelection | None:
    if not config.sparse_decode:
        return None
    if any(w is not None for w in sliding_windows):
        raise ConfigError(
            "sparse_decode in sliding-window layers is not supported; use sparse_decode=False "
            "for this model"
        )
    page = config.page_size
    budget_pages = -(-config.token_budget // page)
    if budget_pages * page != config.token_budget:
        logger.warning(
            "token_budget %d rounded up to whole pages of %d: %d",
            config.token_budget,
            page,
            budget_pages * page,
        )
    if budget_pages * page >= max_model_len:
        logger.info(
            "token_budget %d covers max_model_len %d: decode attends every page",
            budget_pages * page,
            max_model_len,
        )
        return None
    selection = PageSelection(
        page_size=page,
        logical_tokens=page // config.logical_pages_per_page,
        budget_pages=budget_pages,
        interval=config.selector_interval,
        per_query_head=config.page_selection == "query_head",
    )
    logger.info(
        "page selection at decode: %d tokens per request (%d pages), every %d steps, per %s, "
        "logical pages of %d tokens",
        budget_pages * page,
        budget_pages,
        config.selector_interval,
        config.page_selection.replace("_", " "),
        selection.logical_tokens,
    )
    return selection
