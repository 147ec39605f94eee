"""Published results to print beside evaluated methods (HRN supplement Table 1, REALY leaderboard)."""

from __future__ import annotations

import pandas as pd

MICC_SETTINGS = ("Cooperative", "Indoor", "Outdoor")
MICC_SOURCE = "HRN supplement, Table 1 (MICC Florence, point-to-surface distance in mm, symmetric)"

# method: ((mean, std) per setting in MICC_SETTINGS order), millimetres
MICC_PUBLISHED: dict[str, tuple[tuple[float, float], ...]] = {
    "Tran et al.": ((1.93, 0.27), (2.02, 0.25), (1.86, 0.23)),
    "Booth et al.": ((1.82, 0.29), (1.85, 0.22), (1.63, 0.16)),
    "Genova et al.": ((1.50, 0.13), (1.50, 0.11), (1.48, 0.11)),
    "GANFit": ((0.95, 0.107), (0.94, 0.106), (0.94, 0.106)),
    "HRN": ((0.86, 0.108), (0.87, 0.105), (0.83, 0.104)),
}

REALY_REGIONS = ("nose", "mouth", "forehead", "cheek", "all")
REALY_SOURCE = "HRN paper and REALY benchmark (mean error in mm per region)"

# track -> method -> mean per region in REALY_REGIONS order, millimetres
REALY_PUBLISHED: dict[str, dict[str, tuple[float, ...]]] = {
    "frontal": {
        "HRN": (1.722, 1.357, 1.995, 1.072, 1.537),
        "Deep3D": (1.719, 1.368, 2.015, 1.528, 1.657),
    },
    "side": {
        "HRN": (1.642, 1.285, 1.906, 1.038, 1.468),
        "Deep3D": (1.749, 1.411, 2.074, 1.528, 1.691),
    },
}


def micc_published_table() -> pd.DataFrame:
    """Rows: methods; columns: (setting, 'mean' | 'std') in millimetres."""
    columns = pd.MultiIndex.from_product([MICC_SETTINGS, ("mean", "std")], names=["setting", "stat"])
    rows = [[v for pair in values for v in pair] for values in MICC_PUBLISHED.values()]
    return pd.DataFrame(rows, index=pd.Index(list(MICC_PUBLISHED), name="method"), columns=columns)


def realy_published_table(track: str) -> pd.DataFrame:
    """Rows: methods; columns: REALY regions and 'all' (mean error in millimetres)."""
    if track not in REALY_PUBLISHED:
        raise KeyError(f"unknown REALY track {track!r}; choose from {', '.join(REALY_PUBLISHED)}")
    data = REALY_PUBLISHED[track]
    return pd.DataFrame(list(data.values()), index=pd.Index(list(data), name="method"), columns=list(REALY_REGIONS))
