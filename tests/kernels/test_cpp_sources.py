"""Source rules for rarefy's C++ CPU ops (rarefy/kernels/rarefy_check.h says why).

On the lent GPU machines' image (torch 2.11.0+cu130, g++ 13.3) inserting a number into an
ostream from extension code crashes the process, and TORCH_CHECK streams every message
argument. So the ops check their arguments with RAREFY_CHECK_VALUE / RAREFY_CHECK_TYPE,
whose messages are built with std::to_string, and use no iostreams at all. The crash itself
only shows on that image; this keeps the sources from drifting back.
"""

from __future__ import annotations

import pathlib
import re

import pytest

KERNELS = pathlib.Path(__file__).resolve().parents[2] / "rarefy" / "kernels"
SOURCES = sorted(KERNELS.glob("*/*.cpp"))


def test_there_are_sources():
    assert len(SOURCES) >= 6


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_no_streamed_messages(path):
    text = re.sub(r"//[^\n]*", "", path.read_text())  # comments may name what is avoided
    assert not re.search(r"\bTORCH_CHECK\w*\s*\(", text), f"{path.name}: use RAREFY_CHECK_VALUE / RAREFY_CHECK_TYPE"
    assert not re.search(r"std::(ostringstream|stringstream|cout|cerr)\b|#include\s*<(sstream|iostream)>", text), \
        f"{path.name}: no iostreams in the ops"
    if "RAREFY_CHECK" in text:
        assert '#include "../rarefy_check.h"' in text
