"""The test tiers' one rule a convention cannot hold: only a test marked for a tier that may train imports
TensorFlow (make test-quick runs without those tiers and must stay quick).

A test outside those tiers that imports TensorFlow or Keras fails, naming what it imported, even where the
import is caught (`except ImportError`), and even in a process where an earlier test has loaded TensorFlow
already: its modules are hidden from that test, so a new import of them is seen."""

from __future__ import annotations

import importlib.abc
import sys

HEAVY = ("tensorflow", "keras", "tf_keras")
MAY_TRAIN = ("training", "e2e", "slow")  # the markers of the tiers that may import TensorFlow


class HeavyImports(importlib.abc.MetaPathFinder):
    """Refuses (and notes) imports of HEAVY modules while `watching`."""

    def __init__(self, heavy: tuple[str, ...] = HEAVY) -> None:
        self.heavy = heavy
        self.watching = False
        self.refused: list[str] = []
        self.hidden: dict[str, object] = {}

    def find_spec(self, fullname, path, target=None):
        if self.watching and fullname.split(".")[0] in self.heavy:
            self.refused.append(fullname)
            raise ImportError(f"{fullname}: {outside_tier(fullname)}")
        return None

    def watch(self) -> None:
        self.refused = []
        self.hidden = {name: module for name, module in sys.modules.items() if name.split(".")[0] in self.heavy}
        for name in self.hidden:
            del sys.modules[name]
        self.watching = True

    def stop(self) -> list[str]:
        """What was refused since `watch`; TensorFlow's modules are back as they were."""
        self.watching = False
        sys.modules.update(self.hidden)
        self.hidden = {}
        return self.refused


def outside_tier(imported: str) -> str:
    return (
        f"imported by a test outside the tiers that may train ({', '.join(MAY_TRAIN)}): mark it "
        f"@pytest.mark.training if it needs TensorFlow, or reach the code without it"
    )
