# ruff: noqa: RUF001  (curly quotes and dashes are deliberate: the corpus must not be ASCII-only)
"""A realistic synthetic corpus of company-document chunks, and seeding it into MongoDB.

`generate_chunks(n, seed=...)` yields exactly `n` chunk documents, deterministic for a seed:
many companies (names, tickers, US/EU/UK/JP issuers with $, €, £, ¥ figures), several documents
each (10-K, 10-Q, earnings call transcripts, press releases, ESG/sustainability reports, proxy
statements, annual and half-year reports), with chunk texts of long-tailed length (mostly
300-1,500 characters; a few headings under 100; a few over 2,500), figures and periods,
repeated boilerplate (forward-looking statements, safe harbor, "About" paragraphs) and
non-ASCII text (accented executive names, €, curly quotes, dashes).

Ids are readable: company `acme-robotics`, document `acme-robotics-10k-2025`, chunk `_id`
`acme-robotics/acme-robotics-10k-2025/00003`. Generation is streaming (memory does not grow
with `n`) and runs at roughly 30-60k chunks per second on one core.

Every chunk carries its last change date in `fields.updated_at` (an aware UTC datetime; not
written when that setting is None): `seed_store` stamps what it inserts or changes with one
date per call, and leaves unchanged chunks as they were, as an ingestion pipeline would.
`batchyard.seed_changes` edits, deletes, adds and re-chunks seeded chunks the same way.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, Field
from pymongo import ASCENDING, UpdateOne

from batchyard.clients.mongo import DocumentStore
from batchyard.settings import MongoFields
from batchyard.targets import CompanyTarget, Targets

SOURCE_TAG = "synthetic/batchyard-seed"
INGESTED_AT = datetime(2025, 11, 3, 9, 30, tzinfo=UTC)

# --------------------------------------------------------------------------- vocabularies

_ROOTS = [
    "Acme", "Globex", "Initech", "Umbrella", "Stark", "Wayne", "Cyberdyne", "Soylent", "Tyrell",
    "Hooli", "Vandelay", "Massive Dynamic", "Oscorp", "Wonka", "Gringotts", "Aperture", "Black Mesa",
    "Monarch", "Blue Sun", "Weyland", "Nakatomi", "Gekko", "Sterling Cooper", "Dunder Mifflin",
    "Pied Piper", "Prestige Worldwide", "Bluth", "Krusty", "Duff", "Rekall", "Virtucon", "Zorin",
    "Ellingson", "Omni", "Octan", "Sirius", "Polaris", "Meridian", "Cascade", "Summit", "Redwood",
    "Ironclad", "Northwind", "Contoso", "Fabrikam", "Tailspin", "Litware", "Adatum", "Proseware",
    "Halcyon", "Lumen", "Vertex", "Quantum Ridge", "Silverline", "Bright Harbor", "Granite Peak",
    "Evergreen", "Pinnacle", "Horizon", "Atlas", "Helios", "Orion", "Titan", "Cobalt", "Beacon",
    "Lumière", "Müller", "Société Générale des Eaux", "Crédit Rhodanien", "Øresund", "Großmann",
    "Nordlicht", "Peña", "São Bento", "Älvdalen", "Zürcher", "Brønd", "Château-Neuf", "Łódź Metal",
    "Kōbe Seimitsu", "Hoshino", "Sakura", "Fujimori", "Takeda Kōgyō", "Andrés", "Valência",
    "Córdoba", "Dvořák", "Krakowiak", "Ibérica", "Bélanger", "Rhône-Alpes", "Lindqvist",
]
_SECTORS: dict[str, dict[str, list[str]]] = {
    "technology": {
        "words": ["Systems", "Software", "Technologies", "Networks", "Semiconductor", "Cloud"],
        "products": ["cloud platform", "data-center GPUs", "subscription software", "networking equipment",
                     "cybersecurity suite", "analytics platform", "AI accelerators"],
        "segments": ["Cloud Services", "Devices", "Enterprise Software", "Semiconductors"],
        "metric": ["annual recurring revenue", "net revenue retention", "remaining performance obligations"],
    },
    "industrials": {
        "words": ["Industries", "Manufacturing", "Aerospace", "Robotics", "Machinery", "Rail"],
        "products": ["industrial robots", "turbine components", "freight railcars", "precision bearings",
                     "HVAC systems", "factory automation controls"],
        "segments": ["Aerospace", "Automation", "Building Solutions", "Transportation"],
        "metric": ["book-to-bill ratio", "backlog", "orders"],
    },
    "health": {
        "words": ["Therapeutics", "Pharma", "Biosciences", "Medical", "Health", "Diagnostics"],
        "products": ["oncology portfolio", "GLP-1 therapies", "diagnostic assays", "surgical robots",
                     "biosimilars", "vaccines"],
        "segments": ["Pharmaceuticals", "MedTech", "Consumer Health", "Diagnostics"],
        "metric": ["R&D pipeline milestones", "patient starts", "procedure volumes"],
    },
    "energy": {
        "words": ["Energy", "Petroleum", "Renewables", "Power", "Utilities", "Resources"],
        "products": ["offshore wind capacity", "LNG cargoes", "refined products", "solar modules",
                     "grid-scale batteries", "natural gas"],
        "segments": ["Upstream", "Downstream", "Renewables", "Integrated Gas"],
        "metric": ["production in barrels of oil equivalent per day", "installed capacity", "realized prices"],
    },
    "financials": {
        "words": ["Bancorp", "Financial", "Capital", "Insurance", "Holdings", "Trust"],
        "products": ["commercial loans", "wealth management services", "property and casualty policies",
                     "credit cards", "mortgage lending", "asset management"],
        "segments": ["Consumer Banking", "Wealth Management", "Commercial Banking", "Insurance"],
        "metric": ["net interest margin", "CET1 ratio", "combined ratio", "assets under management"],
    },
    "consumer": {
        "words": ["Brands", "Foods", "Retail", "Apparel", "Beverages", "Stores"],
        "products": ["packaged snacks", "athletic footwear", "private-label groceries", "premium spirits",
                     "home furnishings", "e-commerce marketplace"],
        "segments": ["North America Retail", "International", "Wholesale", "Direct-to-Consumer"],
        "metric": ["comparable-store sales", "same-store sales", "gross merchandise volume"],
    },
}
_REGIONS = {
    # region: (currency symbol, legal forms, weight)
    "US": ("$", ["Inc.", "Corp.", "Corporation", "Holdings, Inc.", "Co."], 0.55),
    "EU": ("€", ["AG", "SE", "S.A.", "N.V.", "S.p.A.", "GmbH & Co. KGaA"], 0.25),
    "UK": ("£", ["plc", "Group plc", "Holdings plc"], 0.12),
    "JP": ("¥", ["K.K.", "Corporation", "Co., Ltd."], 0.08),
}
_FIRST = ["Mary", "James", "Priya", "Wei", "Olga", "Daniel", "Sarah", "Ahmed", "Laura", "Kenji",
          "José", "Zoë", "François", "Björn", "Anaïs", "Søren", "Małgorzata", "Renée", "Jürgen",
          "Inês", "Chloé", "Raúl", "Håkon", "Noémie", "Ciarán", "Thomas", "Rebecca", "Michael"]
_LAST = ["Chen", "Okafor", "Patel", "Johnson", "Nakamura", "García", "Álvarez", "Müller",
         "Lefèvre", "Åström", "Kowalczyk", "O'Brien", "Dubois", "Rossi", "Schäfer", "Nørgaard",
         "Fernández", "Smith", "Williams", "Brennan", "Ivanova", "Moreau", "Kim", "Haddad"]
_BANKS = ["Goldman Sachs", "Morgan Stanley", "J.P. Morgan", "BofA Securities", "Barclays",
          "Deutsche Bank", "UBS", "BNP Paribas Exane", "Jefferies", "Bernstein", "Mizuho", "Citi"]

_FLS_GENERIC = (
    "Cautionary Note Regarding Forward-Looking Statements. This document contains forward-looking "
    "statements within the meaning of Section 27A of the Securities Act of 1933 and Section 21E of "
    "the Securities Exchange Act of 1934. Words such as “anticipate,” “believe,” “expect,” "
    "“intend,” “plan,” “project,” “will,” “may” and similar expressions identify forward-looking "
    "statements. These statements are based on management’s current expectations and are subject "
    "to risks and uncertainties that could cause actual results to differ materially, including "
    "changes in economic conditions, competition, supply-chain disruptions, interest-rate and "
    "currency fluctuations, cybersecurity incidents, litigation and regulatory developments. "
    "Forward-looking statements speak only as of the date they are made, and we undertake no "
    "obligation to update them, except as required by law."
)
_FLS_SHORT = (
    "Forward-Looking Statements: This press release contains forward-looking statements that "
    "involve risks and uncertainties. Actual results may differ materially from those expressed or "
    "implied. Readers should not place undue reliance on these statements, which speak only as of "
    "the date of this release. The Company undertakes no obligation to update any forward-looking "
    "statement, whether as a result of new information, future events or otherwise."
)
_SAFE_HARBOR_CALL = (
    "Before we begin, I would like to remind you that today’s discussion contains forward-looking "
    "statements that are subject to risks and uncertainties, and actual results may differ "
    "materially. Please refer to the risk factors in our most recent annual and quarterly reports "
    "for a discussion of these risks. We will also refer to certain non-GAAP financial measures; "
    "reconciliations to the most directly comparable GAAP measures are included in our earnings "
    "release, which is available on the Investor Relations section of our website."
)
_ESG_ASSURANCE = (
    "Basis of preparation. This report has been prepared with reference to the GRI Standards and "
    "the recommendations of the Task Force on Climate-related Financial Disclosures (TCFD). "
    "Greenhouse gas emissions are reported in accordance with the GHG Protocol Corporate Standard. "
    "Selected indicators marked with ✓ have been subject to limited assurance by an independent "
    "third party. Figures may not add up due to rounding."
)

# document kinds: code -> (title template, base chunk weight, regions or None for all)
_KINDS: dict[str, tuple[str, float]] = {
    "10k": ("Annual Report on Form 10-K for fiscal year {year}", 30.0),
    "10q": ("Quarterly Report on Form 10-Q for the quarter ended {qend}", 12.0),
    "ar": ("Annual Report {year}", 30.0),
    "hy": ("Half-Year Financial Report {year}", 12.0),
    "ec": ("{name} {q} {year} Earnings Call Transcript", 9.0),
    "pr": ("Press release: {headline}", 2.0),
    "esg": ("Sustainability Report {year}", 14.0),
    "def14a": ("Proxy Statement for the {year} Annual Meeting of Shareholders", 8.0),
}
_HEADLINES = [
    "{name} Reports Record {q} Results", "{name} Announces Quarterly Dividend",
    "{name} Completes Acquisition of {target}", "{name} Appoints {person} as Chief Financial Officer",
    "{name} Raises Full-Year Outlook", "{name} Announces {amount} Share Repurchase Program",
    "{name} Opens New Facility in {city}", "{name} Prices Offering of Senior Notes",
]
_CITIES = ["Austin", "Rotterdam", "Lyon", "Kraków", "Monterrey", "Osaka", "Manchester", "São Paulo",
           "Düsseldorf", "Malmö", "Singapore", "Pune", "Zaragoza", "Göteborg", "Montréal"]
_HEADINGS = [
    "Item 1A. Risk Factors", "Item 7. Management’s Discussion and Analysis of Financial Condition "
    "and Results of Operations", "Item 8. Financial Statements and Supplementary Data",
    "Liquidity and Capital Resources", "Critical Accounting Estimates", "Segment Information",
    "Question-and-Answer Session", "Table of Contents", "Climate and Environment", "Governance",
    "Executive Compensation", "Outlook", "Results of Operations", "Human Capital",
]


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class _Company:
    company_id: str
    name: str
    ticker: str
    region: str
    currency: str
    sector: str
    ceo: str
    cfo: str
    weight: float


@dataclass(frozen=True)
class _Doc:
    company: _Company
    document_id: str
    kind: str
    title: str
    period: str
    fiscal_year: int
    published: str
    quarter: str
    n_chunks: int


def _ascii_slug(text: str) -> str:
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    out = []
    for ch in folded.lower():
        out.append(ch if ch.isalnum() else "-")
    return "-".join(filter(None, "".join(out).split("-")))


def _derive_rng(seed: int, key: str) -> random.Random:
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def default_company_count(n_chunks: int) -> int:
    """Companies in a corpus of `n_chunks` when not given (about 1.5 x sqrt(n), >= 3)."""
    if n_chunks <= 0:
        return 0
    return max(min(3, n_chunks), min(n_chunks // 40, max(8, round(math.sqrt(n_chunks) * 1.5))))


def _person(rng: random.Random) -> str:
    return f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"


def _make_companies(n: int, rng: random.Random) -> list[_Company]:
    regions = list(_REGIONS)
    region_weights = [_REGIONS[r][2] for r in regions]
    sectors = list(_SECTORS)
    used_ids: set[str] = set()
    used_tickers: set[str] = set()
    companies: list[_Company] = []
    while len(companies) < n:
        root = rng.choice(_ROOTS)
        sector = rng.choice(sectors)
        region = rng.choices(regions, region_weights)[0]
        word = rng.choice(_SECTORS[sector]["words"])
        legal = rng.choice(_REGIONS[region][1])
        base = f"{root} {word}"
        cid = _ascii_slug(base)
        if cid in used_ids:
            k = 2
            while f"{cid}-{k}" in used_ids:
                k += 1
            cid = f"{cid}-{k}"
            base = f"{base} {_roman(k)}"
        used_ids.add(cid)
        letters = [w[0] for w in _ascii_slug(base).split("-") if w]
        tail = [c for c in _ascii_slug(root).replace("-", "")[1:] if c not in "aeiou"]
        ticker = "".join(letters + tail)[:4].upper() or "X"
        if len(ticker) < 3:
            ticker = (ticker + _ascii_slug(word).upper())[:3]
        t, k = ticker, 0
        while t in used_tickers:
            k += 1
            t = f"{ticker[:3]}{chr(ord('A') + (k - 1) % 26)}" if k <= 26 else f"{ticker[:2]}{k}"
        used_tickers.add(t)
        companies.append(
            _Company(
                company_id=cid,
                name=f"{base} {legal}",
                ticker=t,
                region=region,
                currency=_REGIONS[region][0],
                sector=sector,
                ceo=_person(rng),
                cfo=_person(rng),
                weight=rng.lognormvariate(0.0, 0.8),
            )
        )
    return companies


def _roman(k: int) -> str:
    vals = [(10, "X"), (9, "IX"), (5, "V"), (4, "IV"), (1, "I")]
    out = ""
    for v, s in vals:
        while k >= v:
            out += s
            k -= v
    return out


def _largest_remainder(total: int, weights: list[float]) -> list[int]:
    s = sum(weights)
    raw = [total * w / s for w in weights]
    counts = [int(x) for x in raw]
    rest = total - sum(counts)
    order = sorted(range(len(weights)), key=lambda i: (raw[i] - counts[i], -i), reverse=True)
    for i in order[:rest]:
        counts[i] += 1
    return counts


def _docs_for(company: _Company, n_chunks: int, rng: random.Random) -> list[_Doc]:
    year = 2025
    specs: list[tuple[str, str, str, str, str]] = []  # kind, doc id, period, published, quarter
    cid = company.company_id
    if company.region == "US":
        specs.append(("10k", f"{cid}-10k-{year - 1}", f"FY{year - 1}", f"{year}-02-{rng.randint(10, 28):02d}", "FY"))
        for q, (qend, pub) in zip(("Q1", "Q2", "Q3"), (("March 31", "05"), ("June 30", "08"), ("September 30", "11")), strict=True):
            specs.append(("10q", f"{cid}-10q-{year}{q.lower()}", f"{q} {year}|{qend}", f"{year}-{pub}-{rng.randint(1, 14):02d}", q))
        specs.append(("def14a", f"{cid}-def14a-{year}", f"FY{year - 1}", f"{year}-03-{rng.randint(10, 28):02d}", "FY"))
    else:
        specs.append(("ar", f"{cid}-ar-{year - 1}", f"FY{year - 1}", f"{year}-03-{rng.randint(1, 28):02d}", "FY"))
        specs.append(("hy", f"{cid}-hy-{year}", f"H1 {year}", f"{year}-07-{rng.randint(20, 31):02d}", "H1"))
    for q, month in (("Q4", "02"), ("Q1", "04"), ("Q2", "07"), ("Q3", "10")):
        y = year - 1 if q == "Q4" else year
        if rng.random() < 0.85:
            specs.append(("ec", f"{cid}-ec-{y}{q.lower()}", f"{q} {y}", f"{year}-{month}-{rng.randint(18, 30):02d}", q))
    if rng.random() < 0.7:
        specs.append(("esg", f"{cid}-esg-{year - 1}", f"FY{year - 1}", f"{year}-05-{rng.randint(1, 30):02d}", "FY"))
    used_dates: set[str] = set()
    for _ in range(rng.randint(1, 5)):
        date = f"{year}-{rng.randint(1, 10):02d}-{rng.randint(1, 28):02d}"
        if date not in used_dates:
            used_dates.add(date)
            specs.append(("pr", f"{cid}-pr-{date}", date, date, ""))
    weights = [_KINDS[k][1] * rng.uniform(0.7, 1.3) for k, *_ in specs]
    if n_chunks < len(specs):  # keep the heaviest documents only
        keep = sorted(range(len(specs)), key=lambda i: -weights[i])[:n_chunks]
        keep.sort()
        specs = [specs[i] for i in keep]
        weights = [weights[i] for i in keep]
    counts = _largest_remainder(n_chunks - len(specs), weights)
    docs = []
    for (kind, did, period, published, quarter), extra in zip(specs, counts, strict=True):
        fy = int(period[-4:]) if period[-4:].isdigit() else int(published[:4])
        title = _title(kind, company, period, fy, quarter, rng)
        docs.append(
            _Doc(company, did, kind, title, period.split("|")[0], fy, published, quarter, 1 + extra)
        )
    return docs


def _title(kind: str, c: _Company, period: str, fy: int, quarter: str, rng: random.Random) -> str:
    template = _KINDS[kind][0]
    if kind == "pr":
        headline = rng.choice(_HEADLINES).format(
            name=c.name, q=f"Q{rng.randint(1, 4)}", target=f"{rng.choice(_ROOTS)} {rng.choice(_SECTORS[c.sector]['words'])}",
            person=_person(rng), amount=f"{c.currency}{rng.randint(1, 20) * 250} million",
            city=rng.choice(_CITIES),
        )
        return template.format(headline=headline)
    qend = period.split("|")[1] if "|" in period else ""
    return template.format(year=fy, qend=f"{qend}, {fy}", name=c.name, q=quarter)


# --------------------------------------------------------------------------- text


def _money(r: random.Random, cur: str, lo: float = 0.05, hi: float = 60.0) -> str:
    v = math.exp(r.uniform(math.log(lo), math.log(hi)))
    if cur == "¥":
        return f"¥{v * 140:,.0f} billion"
    if v >= 1:
        return f"{cur}{v:,.1f} billion"
    return f"{cur}{v * 1000:,.0f} million"


def _pct(r: random.Random, lo: float = 0.5, hi: float = 35.0) -> str:
    return f"{r.uniform(lo, hi):.1f}%"


class _Ctx:
    """Everything a sentence template needs for one document."""

    __slots__ = ("c", "cur", "d", "period", "r", "vocab")

    def __init__(self, doc: _Doc, r: random.Random) -> None:
        self.d = doc
        self.c = doc.company
        self.cur = doc.company.currency
        self.r = r
        self.vocab = _SECTORS[doc.company.sector]
        self.period = {
            "10k": f"fiscal {doc.fiscal_year}", "ar": f"the {doc.fiscal_year} financial year",
            "10q": f"the {_ordinal(doc.quarter)} quarter of {doc.fiscal_year}",
            "hy": f"the first half of {doc.fiscal_year}",
            "ec": f"the {_ordinal(doc.quarter)} quarter", "esg": f"{doc.fiscal_year}",
            "def14a": f"fiscal {doc.fiscal_year}", "pr": "the quarter",
        }[doc.kind]


def _ordinal(q: str) -> str:
    return {"Q1": "first", "Q2": "second", "Q3": "third", "Q4": "fourth"}.get(q, "current")


_Template = Callable[[_Ctx], str]


def _t_revenue(x: _Ctx) -> str:
    r = x.r
    return (f"Revenue for {x.period} was {_money(r, x.cur)}, {r.choice(['up', 'down', 'an increase of', 'a decrease of'])} "
            f"{_pct(r, 0.3, 24)} compared with the prior-year period, "
            f"{r.choice(['driven by', 'reflecting', 'primarily due to'])} {r.choice(['higher volumes', 'pricing actions', 'favorable mix', 'softer demand', 'currency headwinds'])} "
            f"in {r.choice(x.vocab['products'])}.")


def _t_margin(x: _Ctx) -> str:
    r = x.r
    return (f"Gross margin {r.choice(['expanded', 'contracted', 'was'])} {r.randint(10, 250)} basis points to "
            f"{_pct(r, 18, 72)}, while adjusted operating margin reached {_pct(r, 4, 38)}.")


def _t_segment(x: _Ctx) -> str:
    r = x.r
    return (f"In the {r.choice(x.vocab['segments'])} segment, sales of {_money(r, x.cur, 0.05, 15)} "
            f"{r.choice(['grew', 'declined', 'rose', 'fell'])} {_pct(r, 0.5, 30)} on an organic basis, "
            f"and segment EBITDA was {_money(r, x.cur, 0.01, 5)}.")


def _t_metric(x: _Ctx) -> str:
    r = x.r
    return (f"{r.choice(x.vocab['metric']).capitalize()} stood at {r.choice([_pct(r, 1, 120), _money(r, x.cur, 0.5, 90)])} "
            f"at the end of {x.period}, compared with {r.choice([_pct(r, 1, 120), _money(r, x.cur, 0.5, 90)])} a year earlier.")


def _t_cash(x: _Ctx) -> str:
    r = x.r
    return (f"Cash flow from operating activities was {_money(r, x.cur)} and free cash flow was "
            f"{_money(r, x.cur, 0.02, 20)}. We ended the period with cash and equivalents of "
            f"{_money(r, x.cur)} and total debt of {_money(r, x.cur)}, for a net leverage ratio of "
            f"{r.uniform(0.2, 3.8):.1f}x.")


def _t_return(x: _Ctx) -> str:
    r = x.r
    return (f"We returned {_money(r, x.cur, 0.05, 12)} to shareholders through dividends and share "
            f"repurchases, and the Board approved a quarterly dividend of {x.cur}{r.uniform(0.05, 2.5):.2f} per share.")


def _t_guidance(x: _Ctx) -> str:
    r = x.r
    y = x.d.fiscal_year + (1 if x.d.kind in ("10k", "ar") else 0)
    low = math.exp(r.uniform(math.log(0.5), math.log(80)))
    high = low * r.uniform(1.01, 1.08)
    unit = "billion"
    scale = 140 if x.cur == "¥" else 1
    eps = r.uniform(0.5, 12)
    return (f"For full-year {y}, we now expect revenue of {x.cur}{low * scale:,.1f} to "
            f"{x.cur}{high * scale:,.1f} {unit} and adjusted diluted earnings per share of "
            f"{x.cur}{eps * scale:,.2f} to {x.cur}{eps * scale * r.uniform(1.02, 1.1):,.2f}, "
            f"assuming an effective tax rate of approximately {r.randint(15, 27)}%.")


def _t_risk(x: _Ctx) -> str:
    r = x.r
    risk = r.choice([
        "a prolonged economic downturn could reduce demand for our products",
        "we depend on a limited number of suppliers for critical components",
        "changes in tax laws, including global minimum tax rules, could adversely affect our results",
        "cyberattacks or data breaches could disrupt operations and damage our reputation",
        "our international operations expose us to currency, trade and geopolitical risks",
        "climate-related physical and transition risks may increase our costs",
        "we may not realize the anticipated benefits of acquisitions",
        "regulatory scrutiny of artificial intelligence may limit how we deploy new features",
    ])
    return (f"Risk: {risk}. {r.choice(['Any of these factors', 'Such developments', 'These risks'])} could "
            f"{r.choice(['materially and adversely affect', 'harm', 'negatively impact'])} our business, "
            f"financial condition and results of operations.")


def _t_ops(x: _Ctx) -> str:
    r = x.r
    return (f"During {x.period}, we {r.choice(['launched', 'expanded', 'ramped up production of', 'signed new contracts for'])} "
            f"{r.choice(x.vocab['products'])} in {r.choice(_CITIES)} and employed approximately "
            f"{r.randint(800, 240_000):,} people worldwide.")


def _t_people(x: _Ctx) -> str:
    r = x.r
    return (f"{r.choice([x.c.ceo, x.c.cfo, _person(r)])}, {r.choice(['Chief Executive Officer', 'Chief Financial Officer', 'Chief Operating Officer', 'Head of Investor Relations'])}, "
            f"said: “{r.choice(['We delivered another quarter of disciplined execution', 'Our teams navigated a challenging environment', 'Demand for our solutions remained robust', 'We are investing for long-term growth'])}, "
            f"and we remain confident in our strategy.”")


def _t_esg(x: _Ctx) -> str:
    r = x.r
    return (f"Scope 1 and 2 emissions were {r.randint(5, 4_000):,} thousand tCO₂e, a reduction of "
            f"{_pct(r, 1, 45)} versus our {r.choice([2019, 2020, 2021])} baseline; renewable electricity "
            f"covered {_pct(r, 10, 100)} of consumption, and women held {_pct(r, 18, 48)} of senior leadership roles.")


def _t_comp(x: _Ctx) -> str:
    r = x.r
    return (f"Total compensation of our Chief Executive Officer, {x.c.ceo}, was {x.cur}{r.uniform(1.5, 38):.1f} million, "
            f"of which {_pct(r, 60, 92)} was performance-based and at risk; say-on-pay support at the last "
            f"annual meeting was {_pct(r, 70, 98)}.")


def _t_qa(x: _Ctx) -> str:
    r = x.r
    analyst = _person(r)
    return (f"{analyst} — {r.choice(_BANKS)}: {r.choice(['Thanks for taking my question.', 'Congrats on the quarter.', 'Good morning, everyone.'])} "
            f"Could you talk about {r.choice(['pricing', 'the margin bridge', 'order trends', 'capital allocation', 'inventory levels'])} "
            f"in {r.choice(x.vocab['segments'])} and how we should think about {r.choice(['the second half', 'next year', 'the exit rate'])}? "
            f"{r.choice([x.c.ceo, x.c.cfo])}: Sure. {_t_revenue(x)} {r.choice(['We feel good about the trajectory.', 'We remain cautious on the macro.', 'We will share more at our investor day.'])}")


def _t_pr(x: _Ctx) -> str:
    r = x.r
    return (f"{r.choice(_CITIES).upper()}, {x.d.published} — {x.c.name} ({r.choice(['NYSE', 'NASDAQ', 'Euronext', 'LSE', 'Xetra', 'TSE'])}: {x.c.ticker}) "
            f"today announced {r.choice(['results for', 'an update on', 'a strategic review covering'])} {x.period}. {_t_revenue(x)}")


_BODY: dict[str, list[_Template]] = {
    "10k": [_t_revenue, _t_margin, _t_segment, _t_metric, _t_cash, _t_risk, _t_risk, _t_ops, _t_return],
    "ar": [_t_revenue, _t_margin, _t_segment, _t_metric, _t_cash, _t_risk, _t_ops, _t_esg, _t_return],
    "10q": [_t_revenue, _t_margin, _t_segment, _t_metric, _t_cash, _t_risk, _t_guidance],
    "hy": [_t_revenue, _t_margin, _t_segment, _t_metric, _t_cash, _t_guidance],
    "ec": [_t_qa, _t_qa, _t_revenue, _t_guidance, _t_people, _t_margin, _t_segment],
    "pr": [_t_revenue, _t_people, _t_return, _t_ops, _t_guidance],
    "esg": [_t_esg, _t_esg, _t_ops, _t_people, _t_risk],
    "def14a": [_t_comp, _t_comp, _t_people, _t_return],
}


def _boilerplate(doc: _Doc, i: int) -> str | None:
    """Fixed texts at fixed positions (so the corpus repeats itself like real filings do)."""
    kind, n, c = doc.kind, doc.n_chunks, doc.company
    if kind in ("10k", "10q", "ar", "hy") and i == 1 and n > 3:
        return _FLS_GENERIC
    if kind == "ec":
        if i == 0 and n > 2:
            return (f"Operator: Good day, and welcome to the {c.name} {doc.quarter} {doc.period[-4:]} "
                    f"earnings conference call. All participants are in a listen-only mode. After the "
                    f"speakers’ presentation, there will be a question-and-answer session. Please note "
                    f"that today’s conference is being recorded. I would now like to hand the call over "
                    f"to your host. Please go ahead.")
        if i == 1 and n > 3:
            return _SAFE_HARBOR_CALL
    if kind == "pr" and i == n - 1 and n > 1:
        return _FLS_SHORT
    if kind == "pr" and i == n - 2 and n > 2:
        return (f"About {c.name}: {c.name} is a leading provider of {_SECTORS[c.sector]['products'][0]} and "
                f"{_SECTORS[c.sector]['products'][1]}, serving customers in more than 100 countries. "
                f"For more information, visit the company’s investor relations website.")
    if kind == "esg" and i == 1 and n > 3:
        return _ESG_ASSURANCE
    return None


def _target_length(r: random.Random) -> int:
    u = r.random()
    if u < 0.04:  # headings, table fragments
        return r.randint(15, 120)
    if u < 0.06:  # long sections
        return r.randint(2_500, 7_000)
    return min(1_800, max(250, int(r.lognormvariate(math.log(750), 0.45))))


def _chunk_text(x: _Ctx, i: int) -> str:
    fixed = _boilerplate(x.d, i)
    if fixed is not None:
        return fixed
    r = x.r
    target = _target_length(r)
    if target < 130:
        heading = r.choice(_HEADINGS)
        return heading if len(heading) <= target + 40 else heading.split(".")[0] + "."
    templates = _BODY[x.d.kind]
    parts: list[str] = []
    size = 0
    while size < target:
        s = r.choice(templates)(x)
        parts.append(s)
        size += len(s) + 1
    return " ".join(parts)


# --------------------------------------------------------------------------- public API


def _put(doc: dict[str, Any], path: str, value: Any) -> None:
    if "." not in path:
        doc[path] = value
        return
    *head, last = path.split(".")
    cur = doc
    for key in head:
        cur = cur.setdefault(key, {})
    cur[last] = value


def _plan(n_chunks: int, seed: int, n_companies: int | None) -> Iterator[_Doc]:
    if n_chunks <= 0:
        return
    n_comp = default_company_count(n_chunks) if n_companies is None else n_companies
    if n_comp <= 0:
        raise ValueError("n_companies must be at least 1")
    n_comp = min(n_comp, n_chunks)
    rng = _derive_rng(seed, "companies")
    companies = _make_companies(n_comp, rng)
    per_company = _largest_remainder(n_chunks - n_comp, [c.weight for c in companies])
    for company, extra in zip(companies, per_company, strict=True):
        yield from _docs_for(company, 1 + extra, _derive_rng(seed, f"docs:{company.company_id}"))


def now_ms() -> datetime:
    """The current UTC time at BSON's millisecond precision (what MongoDB gives back)."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def generate_chunks(
    n_chunks: int,
    *,
    seed: int = 0,
    n_companies: int | None = None,
    fields: MongoFields | None = None,
    updated_at: datetime = INGESTED_AT,
) -> Iterator[dict[str, Any]]:
    """Yield exactly `n_chunks` synthetic chunk documents (deterministic for `seed`).

    Field names follow `fields` (default `MongoFields()`); `_id` is always the readable
    `company/document/00003` string, also written to `fields.chunk_id` when that is not `_id`.
    `updated_at` goes into `fields.updated_at` (when set).
    """
    f = fields or MongoFields()
    for doc in _plan(n_chunks, seed, n_companies):
        c = doc.company
        x = _Ctx(doc, _derive_rng(seed, f"text:{doc.document_id}"))
        for i in range(doc.n_chunks):
            chunk_id = f"{c.company_id}/{doc.document_id}/{i:05d}"
            out: dict[str, Any] = {"_id": chunk_id}
            if f.chunk_id != "_id":
                _put(out, f.chunk_id, chunk_id)
            _put(out, f.company, c.company_id)
            _put(out, f.document, doc.document_id)
            _put(out, f.chunk_index, i)
            _put(out, f.text, _chunk_text(x, i))
            out["company_name"] = c.name
            out["ticker"] = c.ticker
            out["sector"] = c.sector
            out["doc_type"] = doc.kind
            out["title"] = doc.title
            out["period"] = doc.period
            out["fiscal_year"] = doc.fiscal_year
            out["published"] = doc.published
            out["source"] = SOURCE_TAG
            out["ingested_at"] = INGESTED_AT
            if f.updated_at:
                _put(out, f.updated_at, updated_at)
            yield out


class SeedReport(BaseModel):
    """What `seed_store` wrote."""

    companies: int = Field(description="Companies in the corpus.")
    documents: int = Field(description="Documents in the corpus.")
    chunks: int = Field(description="Chunks written (inserted + already present).")
    inserted: int = Field(default=0, description="Chunks that were new.")
    updated: int = Field(default=0, description="Existing chunks whose content changed (re-stamped).")
    updated_at: datetime | None = Field(default=None, description="The change date stamped on what was written.")
    seconds: float = Field(default=0.0, description="Wall time.")
    seed: int = Field(default=0, description="Generator seed.")
    catalog: dict[str, list[str]] = Field(
        default_factory=dict, description="Company id -> its document ids, in generation order."
    )


def seed_store(
    store: Any,
    n_chunks: int,
    *,
    fields: MongoFields | None = None,
    seed: int = 0,
    batch_size: int = 5_000,
    n_companies: int | None = None,
    updated_at: datetime | None = None,
) -> SeedReport:
    """Write `generate_chunks(n_chunks, seed=...)` into `store.chunks` (or a collection).

    New chunks go in with `insert_many`; chunks that already exist are compared with what was
    generated and only those that differ are updated (`$set` of the generated fields, an upsert),
    so reseeding is idempotent and keeps batchyard's marks. What is inserted or updated gets
    `updated_at` (default: now, at millisecond precision) in `fields.updated_at`. Also creates a
    (company, document, _id) index and, with a change field, an index on it.
    """
    f = fields or MongoFields()
    stamp = updated_at or now_ms()
    # a Collection's attribute access yields a sub-collection, so test the type, not hasattr
    coll = store.chunks if isinstance(store, DocumentStore) else store
    start = time.perf_counter()
    catalog: dict[str, list[str]] = {}
    inserted = updated = total = 0
    batch: list[dict[str, Any]] = []

    def content(doc: dict[str, Any]) -> Any:
        """What a chunk holds besides its id and change date, dates compared as MongoDB keeps them."""
        return _comparable(_without({k: v for k, v in doc.items() if k != "_id"}, f.updated_at))

    def flush() -> None:
        nonlocal inserted, updated
        ids = [d["_id"] for d in batch]
        projection = dict.fromkeys((k for k in batch[0] if k != "_id"), 1)
        existing = {d["_id"]: d for d in coll.find({"_id": {"$in": ids}}, projection)}
        new = [d for d in batch if d["_id"] not in existing]
        if new:
            inserted += len(coll.insert_many(new, ordered=False).inserted_ids)
        ops = [
            UpdateOne({"_id": d["_id"]}, {"$set": {k: v for k, v in d.items() if k != "_id"}}, upsert=True)
            for d in batch
            if d["_id"] in existing and content(existing[d["_id"]]) != content(d)
        ]
        if ops:
            res = coll.bulk_write(ops, ordered=False)
            updated += res.modified_count + res.upserted_count
        batch.clear()

    for doc in generate_chunks(n_chunks, seed=seed, n_companies=n_companies, fields=f, updated_at=stamp):
        company = _get(doc, f.company)
        document = _get(doc, f.document)
        docs = catalog.setdefault(company, [])
        if not docs or docs[-1] != document:
            docs.append(document)
        batch.append(doc)
        total += 1
        if len(batch) >= batch_size:
            flush()
    if batch:
        flush()
    coll.create_index([(f.company, ASCENDING), (f.document, ASCENDING), ("_id", ASCENDING)],
                      name="batchyard_company_document_id")
    if f.updated_at:
        coll.create_index([(f.updated_at, ASCENDING)], name="batchyard_updated_at")
    return SeedReport(
        companies=len(catalog),
        documents=sum(len(v) for v in catalog.values()),
        chunks=total,
        inserted=inserted,
        updated=updated,
        updated_at=stamp if f.updated_at else None,
        seconds=round(time.perf_counter() - start, 3),
        seed=seed,
        catalog=catalog,
    )


def _without(doc: dict[str, Any], path: str | None) -> dict[str, Any]:
    """`doc` without the value at a dotted `path` (its parents copied, the rest shared)."""
    if not path:
        return doc
    head, _, rest = path.partition(".")
    if head not in doc:
        return doc
    out = dict(doc)
    if not rest:
        del out[head]
    elif isinstance(out[head], dict):
        out[head] = _without(out[head], rest)
    return out


def _comparable(value: Any) -> Any:
    """Dates as naive UTC milliseconds, recursively (a tz-naive client reads them back so)."""
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        return value.replace(microsecond=value.microsecond // 1000 * 1000)
    if isinstance(value, dict):
        return {k: _comparable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_comparable(v) for v in value]
    return value


def _get(doc: dict[str, Any], path: str) -> Any:
    cur: Any = doc
    for key in path.split("."):
        cur = cur[key]
    return cur


def targets_for(report: SeedReport, *, all_documents: bool = False) -> Targets:
    """Targets covering everything a seed wrote (each document listed, or all per company)."""
    return Targets(
        companies=[
            CompanyTarget(company_id=cid, documents=None if all_documents else list(docs))
            for cid, docs in report.catalog.items()
        ]
    )
