"""What one ILA gate covers, named the same way in the gates, in ila.json and on the command
line. Imports no torch, so `surgery ila --help` and reading an ila.json stay cheap."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

WHOLE_BLOCK = "*"  # the module name of a unit that ties all matrices of a block


class UnitKind(str, Enum):
    """What one gate covers."""

    module = "module"  # one weight matrix of a block (the paper's "layer")
    block = "block"  # all matrices of a block, tied to one gate


@dataclass(frozen=True)
class Unit:
    block: int
    module: str  # relative to the block; WHOLE_BLOCK for a tied block

    @property
    def name(self) -> str:
        return str(self.block) if self.module == WHOLE_BLOCK else f"{self.block}.{self.module}"
