#!/usr/bin/env python3
"""Write the example training data for softserve's three example tasks.

    python scripts/make_example_data.py [--out examples/data] [--seed 1234]

Outputs, one JSON object per line:

    ner.train.jsonl   (1200)  ner.heldout.jsonl   (300)   {"text", "entities": [{"start","end","label"}]}
    spam.train.jsonl  (1000)  spam.heldout.jsonl  (250)   {"text", "label": "spam"|"ham"}
    chat.train.jsonl  (200)   chat.heldout.jsonl  (50)    {"messages": [{"role","content"}, ...]}

Deterministic (one fixed seed per task, stdlib only, no network). The data is synthetic and templated;
see examples/data/README.md for how the held-out splits are kept partially disjoint from training.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import re
from pathlib import Path

# --------------------------------------------------------------------------------------------------
# helpers


def split_pool(items: list[str], heldout_every: int = 4) -> tuple[list[str], list[str]]:
    """Every `heldout_every`-th item is held-out only; the rest may appear in both splits."""
    shared = [x for i, x in enumerate(items) if i % heldout_every != heldout_every - 1]
    heldout_only = [x for i, x in enumerate(items) if i % heldout_every == heldout_every - 1]
    return shared, heldout_only


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def fmt_num(x: float) -> str:
    """3500.0 -> '3500', 2.54 -> '2.54', 1.6093 -> '1.61'."""
    s = f"{x:.2f}".rstrip("0").rstrip(".")
    return "0" if s == "-0" else s


# --------------------------------------------------------------------------------------------------
# NER

FIRST_NAMES = [
    "Maria", "James", "Aisha", "Wei", "Hiroshi", "Olga", "Carlos", "Priya", "Kwame", "Fatima",
    "Lars", "Mei", "Ahmed", "Sofia", "Rahul", "Ngozi", "Diego", "Yuki", "Elena", "Tomasz",
    "Amara", "Jin-woo", "Leila", "Mateo", "Ingrid", "Oluwaseun", "Chen", "Anika", "Rafael", "Svetlana",
    "Kofi", "Hana", "Daniel", "Zanele", "Arjun", "Bronwyn", "Nikolai", "Camila", "Tariq", "Astrid",
    "Thandiwe", "Bao", "Giulia", "Emeka", "Sunita", "Bjorn", "Yerlan", "Paloma", "Kenji", "Adaeze",
    "Malik", "Saoirse", "Farhan", "Lucia", "Dmitri", "Ayesha", "Mateus", "Nomvula", "Haruto", "Rosa",
]
LAST_NAMES = [
    "Okafor", "Nguyen", "Schmidt", "Tanaka", "Garcia", "Kowalski", "Haddad", "Patel", "Johansson", "Mensah",
    "Rossi", "Ivanova", "Kim", "Fernandes", "O'Brien", "Mbeki", "Yamamoto", "Dubois", "Castillo", "Chaudhry",
    "Andersen", "Adeyemi", "Lindqvist", "Moreau", "Sato", "Hernandez", "Novak", "Osei", "Wang", "Murphy",
    "Banerjee", "Petrov", "Silva", "Nakamura", "Abdullah", "Eriksen", "Mwangi", "Costa", "Singh", "Weber",
    "Achterberg", "Suleiman", "Takahashi", "Delgado", "Kariuki", "Horvath", "Pereira", "Rahman", "Fitzgerald", "Zhou",
]

COMPANY_ROOTS = [
    "Halvorsen", "Brightwater", "Northgate", "Kestrel", "Aldmere", "Sunvale", "Ironbridge", "Meridian",
    "Bluefin", "Tamarind", "Castellan", "Redwood", "Silverline", "Harborview", "Zephyr", "Vantage",
    "Crescent", "Pinecrest", "Obsidian", "Marigold", "Quillon", "Sterling", "Arcadia", "Velora",
    "Kingsbury", "Rosario", "Lumen", "Granite Peak", "Oakhurst", "Coral Bay", "Tidewell", "Ashcombe",
    "Novaris", "Everline", "Stonebridge", "Amberfield", "Calder", "Westmarch", "Orchid", "Helix",
]
COMPANY_KINDS = [
    "Logistics", "Capital", "Pharmaceuticals", "Holdings", "Energy", "Systems", "Foods", "Insurance",
    "Biotech", "Partners", "Software", "Mining", "Textiles", "Airlines", "Motors", "Telecom",
    "Analytics", "Robotics", "Shipping", "Semiconductor",
]
COMPANY_SUFFIXES = ["Inc.", "LLC", "Ltd", "plc", "GmbH", "AG", "S.A.", "Corp.", "AS", "Pty Ltd", "", "", ""]

COURTS = [
    "Delaware Court of Chancery", "High Court of Justice", "Supreme Court of Canada",
    "United States District Court for the Southern District of New York",
    "Court of Justice of the European Union", "Federal Court of Australia", "Bombay High Court",
    "Ninth Circuit Court of Appeals", "Tokyo District Court", "Singapore International Commercial Court",
    "Supreme Court of the United Kingdom", "Ontario Superior Court of Justice", "Paris Commercial Court",
    "High Court of Kenya", "Constitutional Court of South Africa", "Federal Court of Justice",
]
AGENCIES = [
    "Securities and Exchange Commission", "Federal Trade Commission", "Department of Justice",
    "Competition and Markets Authority", "European Commission", "Financial Conduct Authority",
    "Bundeskartellamt", "Australian Competition and Consumer Commission", "Internal Revenue Service",
    "Environmental Protection Agency", "Commodity Futures Trading Commission", "Monetary Authority of Singapore",
    "Securities and Exchange Board of India", "Food and Drug Administration", "European Central Bank",
    "Japan Fair Trade Commission", "Ontario Securities Commission", "Central Bank of Nigeria",
    "National Labor Relations Board", "Office of the Comptroller of the Currency",
]
CITIES = [
    "London", "Lagos", "Singapore", "Frankfurt", "Sao Paulo", "Mumbai", "Toronto", "Nairobi",
    "Osaka", "Melbourne", "Rotterdam", "Dubai", "Chicago", "Warsaw", "Seoul", "Johannesburg",
    "Lyon", "Austin", "Zurich", "Jakarta", "Buenos Aires", "Manchester", "Hanoi", "Oslo",
]
COUNTRIES = [
    "Germany", "Brazil", "Japan", "Nigeria", "India", "Canada", "Mexico", "Kenya",
    "France", "Australia", "Vietnam", "Poland", "Chile", "Egypt", "Norway", "South Korea",
]
STATES = [
    "California", "Texas", "Delaware", "New York", "Ontario", "Bavaria", "Queensland", "Maharashtra",
    "Florida", "Quebec", "Victoria", "Illinois",
]

# Roles and amounts are fillers, not entities.
ROLES = ["chief executive", "chief financial officer", "general counsel", "chair of the board",
         "head of compliance", "managing director", "chief operating officer", "company secretary"]
AMOUNTS = ["$1.2 billion", "$450 million", "EUR 80 million", "$3.5 billion", "GBP 12 million",
           "$700,000", "$25 million", "JPY 4 billion", "$1.9 million", "EUR 300,000"]
PCTS = ["4%", "12%", "0.5%", "27%", "8.3%", "15%", "2.1%"]

# Placeholder -> entity label. Lower-case placeholders are plain fillers (no entity).
SLOT_LABEL = {
    "CO": "ORG", "COURT": "ORG", "AGENCY": "ORG",
    "PER": "PERSON", "DATE": "DATE", "PERIOD": "DATE",
    "CITY": "LOC", "COUNTRY": "LOC", "STATE": "LOC",
}

NER_TEMPLATES = [
    "{PER} was appointed {role} of {CO} on {DATE}.",
    "{CO} agreed to acquire {CO} for {amount}, the companies said on {DATE}.",
    "The {COURT} ruled on {DATE} that {CO} had breached its supply contract with {CO}.",
    "{PER}, a lawyer for {CO}, said the company would appeal.",
    "The {AGENCY} fined {CO} {amount} for misleading investors.",
    "{CO} will open a new distribution centre in {CITY} in {PERIOD}.",
    "Shares of {CO} fell {pct} after the {AGENCY} opened an investigation.",
    "The agreement is governed by the laws of the State of {STATE}.",
    "{PER} and {PER} signed the merger agreement in {CITY} on {DATE}.",
    "{CO} reported revenue of {amount} for {PERIOD}, up {pct} year on year.",
    "The hearing before the {COURT} has been adjourned until {DATE}.",
    "According to {PER}, {CO} plans to expand into {COUNTRY} next year.",
    "{CO}, headquartered in {CITY}, {COUNTRY}, employs more than 4,000 people.",
    "On {DATE}, the {AGENCY} approved the sale of {CO} to {CO}.",
    "This lease between {CO} and {PER} commences on {DATE}.",
    "{PER} resigned as {role} of {CO} effective {DATE}.",
    "The board of {CO} met in {CITY} to review the offer from {CO}.",
    "{CO} filed for insolvency protection in {STATE} on {DATE}.",
    "Judge {PER} of the {COURT} dismissed the claim against {CO}.",
    "The {AGENCY} said on {DATE} that it would not challenge the deal.",
    "{PER} will succeed {PER} as {role} of {CO}.",
    "{CO} signed a five-year licensing agreement with {CO} covering {COUNTRY} and {COUNTRY}.",
    "Invoices must be paid within thirty days, and any dispute shall be heard in {CITY}.",
    "Our {CITY} office will be closed from {DATE} for the public holiday.",
    "{CO} settled the lawsuit brought by {PER} for an undisclosed sum.",
    "The contract was executed on {DATE} and expires on {DATE}.",
    "{PER} told analysts that {CO} expects margins to improve by {pct}.",
    "The {AGENCY} has asked {CO} to provide documents by {DATE}.",
    "{CO} moved its registered office from {CITY} to {CITY}.",
    "Both parties submit to the exclusive jurisdiction of the courts of {COUNTRY}.",
    "A spokesperson for {CO} declined to comment.",
    "{PER}, who founded {CO} in {CITY}, owns about {pct} of the shares.",
    "The {COURT} granted {CO} an injunction against {CO} on {DATE}.",
    "{CO} raised {amount} in a funding round led by {CO}.",
    "Please send the signed copy to {PER} before {DATE}.",
    "The plant in {STATE} will be operated jointly by {CO} and {CO}.",
    "{PER} from our {CITY} team will lead the audit of {CO}.",
    "{CO} was incorporated in {STATE} on {DATE}.",
    "Regulators in {COUNTRY} and the {AGENCY} are reviewing the transaction.",
    "{PER} testified before the {COURT} on {DATE}.",
    "{CO} appointed {PER} and {PER} to its board of directors.",
    "The arbitration will take place in {CITY} under the rules agreed by {CO} and {CO}.",
    # no entities
    "The parties agree that this clause survives termination of the agreement.",
    "Payment is due within thirty days of the invoice date.",
    "The company expects to announce its results after the audit is complete.",
    "Neither party may assign this agreement without prior written consent.",
    "The committee will meet again once the report has been circulated.",
    "Revenue grew modestly despite higher input costs.",
    "The {role} will present the quarterly figures to the board.",
    "Operating profit rose {pct} on higher volumes.",
    "The buyer will pay {amount} in cash at closing.",
    "The {role} approved a budget of {amount} for the project.",
    "Costs fell {pct} after the restructuring, the {role} said.",
    "A penalty of {amount} applies to each late delivery.",
    # one entity
    "{CO} cut its annual forecast by {pct}.",
    "The {AGENCY} published new disclosure rules for listed companies.",
    "Contact {PER} with any questions about the invoice.",
    "Consumer prices in {COUNTRY} rose {pct} last year.",
    "The meeting has been moved to {DATE}.",
    "{PER} joined the legal team as {role}.",
    "Our new warehouse near {CITY} is now fully operational.",
    "Shares in {CO} rose {pct} in early trading.",
    "{CO} expects to break even in {PERIOD}.",
    "The {AGENCY} will publish its findings in {PERIOD}.",
    "{CO} is based in {CITY}.",
]
# Templates that only ever appear in the held-out split.
NER_HELDOUT_TEMPLATES = [
    "Counsel for {CO} told the {COURT} that {PER} had no authority to sign.",
    "{CO} said on {DATE} that it had completed its purchase of {CO}'s operations in {COUNTRY}.",
    "The {AGENCY} cleared {PER} of wrongdoing on {DATE}.",
    "Under the settlement, {CO} will pay {amount} to customers in {STATE}.",
    "{PER}, speaking in {CITY}, said {CO} would cut {pct} of its workforce.",
    "The deadline for objections to the {COURT} is {DATE}.",
    "{CO} and {CO} ended their joint venture in {COUNTRY} on {DATE}.",
    "Notices under this agreement shall be sent to {PER} at the {CITY} office of {CO}.",
    "{PER} was named {role} of {CO}, replacing {PER}.",
    "The {AGENCY} blocked the merger of {CO} and {CO}.",
    "Any amendment must be approved in writing by both parties.",
    "Shipments from {CITY} to {COUNTRY} resumed on {DATE}.",
    "Sales in {COUNTRY} doubled in {PERIOD}, {PER} said.",
    "The {role} signed the amended agreement.",
    "Demand in {STATE} remained weak.",
    "Please forward the draft to {PER}.",
]

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
MONTH_ABBR = ["Jan.", "Feb.", "March", "April", "May", "June", "July", "Aug.", "Sept.", "Oct.", "Nov.", "Dec."]


def format_date(d: dt.date, period: bool, novel: bool, rng: random.Random) -> str:
    """{DATE} is a day ("on {DATE}"); {PERIOD} is a month, quarter or half ("in {PERIOD}")."""
    if period:
        if novel:
            return f"H{1 if d.month <= 6 else 2} {d.year}"                      # H1 2023 (held-out only)
        return rng.choice([f"{MONTHS[d.month - 1]} {d.year}",                    # March 2021
                           f"Q{(d.month - 1) // 3 + 1} {d.year}"])               # Q1 2021
    if novel:
        return f"{MONTH_ABBR[d.month - 1]} {d.day}, {d.year}"                    # Sept. 14, 2023 (held-out only)
    return rng.choice([f"{MONTHS[d.month - 1]} {d.day}, {d.year}",               # March 3, 2021
                       f"{d.day} {MONTHS[d.month - 1]} {d.year}",                # 3 March 2021
                       d.isoformat()])                                           # 2021-03-03


class NerFillers:
    def __init__(self) -> None:
        self.first = split_pool(FIRST_NAMES)
        self.last = split_pool(LAST_NAMES)
        self.roots = split_pool(COMPANY_ROOTS)
        self.courts = split_pool(COURTS)
        self.agencies = split_pool(AGENCIES)
        self.cities = split_pool(CITIES)
        self.countries = split_pool(COUNTRIES)
        self.states = split_pool(STATES)

    def draw(self, rng: random.Random, slot: str, heldout: bool) -> str:
        # In held-out, each entity comes from the held-out-only pool with probability 0.5.
        novel = heldout and rng.random() < 0.5

        def pick(pools: tuple[list[str], list[str]]) -> str:
            return rng.choice(pools[1] if novel else pools[0])

        if slot == "PER":
            return f"{pick(self.first)} {pick(self.last)}"
        if slot == "CO":
            name = pick(self.roots)
            if rng.random() < 0.75:
                name += " " + rng.choice(COMPANY_KINDS)
            suffix = rng.choice(COMPANY_SUFFIXES)
            return f"{name} {suffix}" if suffix else name
        if slot == "COURT":
            return pick(self.courts)
        if slot == "AGENCY":
            return pick(self.agencies)
        if slot == "CITY":
            return pick(self.cities)
        if slot == "COUNTRY":
            return pick(self.countries)
        if slot == "STATE":
            return pick(self.states)
        if slot in ("DATE", "PERIOD"):
            year_hi = 2025 if heldout else 2023
            d = dt.date(rng.randint(2015, year_hi), rng.randint(1, 12), rng.randint(1, 28))
            return format_date(d, slot == "PERIOD", novel, rng)
        if slot == "role":
            return rng.choice(ROLES)
        if slot == "amount":
            return rng.choice(AMOUNTS)
        if slot == "pct":
            return rng.choice(PCTS)
        raise KeyError(slot)


SLOT_RE = re.compile(r"\{(\w+)\}")


def render_ner(template: str, rng: random.Random, fillers: NerFillers, heldout: bool) -> dict:
    text = ""
    entities = []
    used: set[str] = set()
    pos = 0
    for m in SLOT_RE.finditer(template):
        text += template[pos:m.start()]
        slot = m.group(1)
        for _ in range(20):  # distinct fillers within one sentence ("X acquired X" reads wrong)
            value = fillers.draw(rng, slot, heldout)
            if value not in used:
                break
        used.add(value)
        if slot in SLOT_LABEL:
            entities.append({"start": len(text), "end": len(text) + len(value), "label": SLOT_LABEL[slot]})
        text += value
        pos = m.end()
        if value.endswith(".") and template[pos:pos + 1] == ".":
            pos += 1  # "Inc." at the end of a sentence: no double period
    text += template[pos:]
    for e in entities:
        span = text[e["start"]:e["end"]]
        assert span and span == span.strip(), (text, e)
    return {"text": text, "entities": entities}


def template_weights(templates: list[str]) -> list[float]:
    """Favour sentences with few entities so that 3-4 entity sentences are a minority."""
    per_count = [1.6, 1.4, 1.1, 0.7, 0.5]
    return [per_count[min(4, sum(s in SLOT_LABEL for s in SLOT_RE.findall(t)))] for t in templates]


def make_ner(seed: int, n_train: int, n_heldout: int) -> tuple[list[dict], list[dict], dict]:
    rng = random.Random(seed)
    fillers = NerFillers()
    w_train, w_held = template_weights(NER_TEMPLATES), template_weights(NER_HELDOUT_TEMPLATES)
    train, seen = [], set()
    while len(train) < n_train:
        row = render_ner(rng.choices(NER_TEMPLATES, w_train)[0], rng, fillers, heldout=False)
        if row["text"] not in seen:
            seen.add(row["text"])
            train.append(row)
    heldout, seen_h = [], set()
    while len(heldout) < n_heldout:
        pool, w = (NER_HELDOUT_TEMPLATES, w_held) if rng.random() < 0.5 else (NER_TEMPLATES, w_train)
        row = render_ner(rng.choices(pool, w)[0], rng, fillers, heldout=True)
        if row["text"] not in seen and row["text"] not in seen_h:
            seen_h.add(row["text"])
            heldout.append(row)

    def check(rows: list[dict]) -> None:
        for r in rows:
            for e in r["entities"]:
                assert 0 <= e["start"] < e["end"] <= len(r["text"]), r

    check(train)
    check(heldout)
    train_surface = {r["text"][e["start"]:e["end"]] for r in train for e in r["entities"]}
    mentions = [r["text"][e["start"]:e["end"]] for r in heldout for e in r["entities"]]
    unseen = sum(m not in train_surface for m in mentions)
    stats = {
        "heldout_mentions": len(mentions),
        "heldout_mentions_unseen_in_train": unseen,
        "train_no_entity": sum(not r["entities"] for r in train),
        "train_3plus_entities": sum(len(r["entities"]) >= 3 for r in train),
    }
    return train, heldout, stats


# --------------------------------------------------------------------------------------------------
# spam / ham

SENDERS = ["Priya Raman", "Tom Becker", "Ana Souza", "Kenji Watanabe", "Grace Mensah", "Luca Bianchi",
           "Hannah Cho", "Omar Farouk", "Elise Martin", "Sipho Dlamini", "Rachel Levy", "Marek Nowak"]
RECIPIENTS = ["Sam", "Alex", "Jordan", "Chris", "Taylor", "Morgan", "Jamie", "Robin", "Dana", "Lee"]
FAMILY = ["Mum", "Dad", "Grandma", "Auntie Rose", "your brother", "Nana"]
PROJECTS = ["Q3 budget review", "website redesign", "Atlas migration", "supplier onboarding",
            "annual report", "mobile app launch", "data warehouse cleanup", "hiring plan"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]
TIMES = ["9:30", "10:00", "11:15", "13:00", "14:30", "16:00"]
CARRIERS = ["DHL", "UPS", "Royal Mail", "FedEx", "PostNL", "Canada Post"]
SHOPS = ["Bookshelf Co", "Greenleaf Garden Supplies", "Northwind Outdoor", "PixelPoint Electronics",
         "Harbor Kitchenware", "Little Sprout Toys"]
NEWSLETTERS = ["The Weekly Byte", "Local Food Co-op News", "Running Club Digest", "Python Weekly",
               "City Library Updates", "The Gardening Letter"]
COINS = ["Bitcoin", "Ethereum", "DOGE", "a new token called NOVA", "USDT"]
DRUGS = ["V1agra", "weight-loss pills", "Cialis", "painkillers", "slimming patches"]
BANKS = ["your bank", "PayPal", "Netflix", "Amazon", "Apple ID", "your mailbox"]
PRIZES = ["an iPhone 16", "$5,000 in cash", "a luxury cruise", "a $1,000 gift card", "a brand-new car"]
SPAM_LINKS = ["http://claim-reward-now.top/win", "http://secure-verify-account.info/login",
              "bit.ly/3xWin9", "http://cheap-meds-online.biz", "http://crypto-double.xyz/start",
              "http://invoice-view-portal.co/doc"]
HAM_LINKS = ["the shared drive", "the project wiki", "the calendar invite", "the team folder"]


def _money(rng: random.Random) -> str:
    return f"${rng.choice([49, 120, 380, 950, 1250, 2400, 4875]):,}.{rng.choice(['00', '50', '99'])}"


SPAM_TEMPLATES = [
    "Subject: CONGRATULATIONS!!!\n\nDear winner, you have been selected to receive {prize}. Click {spam_link} within 24 hours to claim your reward.",
    "URGENT: your {bank} account has been suspended due to unusual activity. Verify your password at {spam_link} or it will be closed.",
    "Subject: Double your {coin} in 7 days\n\nOur trading bot made members 400% last month. Send any amount and receive twice back, guaranteed. Start now: {spam_link}",
    "Buy {drug} online, no prescription needed! 80% off today only. Discreet shipping worldwide. {spam_link}",
    "Subject: Overdue invoice #{num}\n\nYour payment of {money} is overdue. Download the attached invoice and wire the amount today to avoid legal action. View: {spam_link}",
    "Hello dear, I am a lawyer representing a late client with no heirs. You are entitled to $4.5 million. Reply with your bank details to proceed.",
    "You've won! Text WIN to 80085 now to claim {prize}. Std msg rates apply. Reply STOP to opt out.",
    "Subject: Work from home and earn $500 a day\n\nNo experience needed. Just 2 hours a day. Limited spots, register at {spam_link}",
    "Your package could not be delivered. Pay a {money} redelivery fee here: {spam_link}",
    "Subject: Your {bank} payment failed\n\nWe could not process your last payment. Update your card details within 12 hours: {spam_link}",
    "Hi {recipient}, this is the CEO. I need you to buy 5 gift cards of $200 each for a client, urgently. Send me the codes and keep this confidential.",
    "Pre-approved loan of $25,000 at 0% interest! No credit check. Apply in 60 seconds: {spam_link}",
    "Subject: Exclusive {coin} presale\n\nOnly 100 spots left. Early investors get 50x returns. Connect your wallet at {spam_link}",
    "Lose 10 kg in 10 days with our miracle {drug}! Doctors hate this trick. Order now: {spam_link}",
    "Subject: Security alert\n\nSomeone tried to sign in to {bank} from Russia. If this wasn't you, confirm your identity here: {spam_link}",
    "Subject: Final notice - invoice {num} from accounts dept\n\nThe attached invoice is past due. Pay {money} by gift card or bank transfer within 48 hours.",
]
SPAM_HELDOUT_TEMPLATES = [
    "Subject: Tax refund pending\n\nYou are eligible for a refund of {money}. Submit your card number at {spam_link} to receive it today.",
    "Hot singles in your area want to meet you tonight! Click {spam_link}",
    "Subject: Your mailbox is full\n\nYou have 14 undelivered messages. Log in at {spam_link} to release them before they are deleted.",
    "Invest {money} today in {coin} and retire next year. Our experts guarantee profit. Reply YES to join.",
    "Dear customer, you have been chosen for our survey. Complete it and get {prize} free: {spam_link}",
]
HAM_TEMPLATES = [
    "Subject: Notes from {weekday}'s {project} meeting\n\nHi all, attached are the notes. Action items: {sender} to update the timeline, {recipient} to confirm the budget. Next sync {weekday} at {time}.",
    "Subject: Invoice {num} for March\n\nHi {recipient}, please find attached invoice {num} for {money} covering the consulting work we agreed. Payment terms are net 30 as per our contract. Thanks, {sender}",
    "Hi love, it's {family}. Are you still coming for dinner on {weekday}? I'm making the lasagne you like. Call me when you can.",
    "Your order from {shop} has shipped. {carrier} tracking number {tracking}. Estimated delivery: {weekday}.",
    "Subject: {newsletter} - this week's issue\n\nThanks for subscribing. This week: three short articles, a reader question and upcoming events. Unsubscribe any time from your account settings.",
    "Hey {recipient}, can you review my pull request for the {project} when you get a chance? No rush, sometime before {weekday}.",
    "Subject: Reminder: dentist appointment\n\nThis is a reminder of your appointment on {weekday} at {time}. Reply C to confirm or call the practice to reschedule.",
    "Subject: Re: {project}\n\nThanks {sender}, that works for me. I've moved the files to {ham_link} so everyone can see them.",
    "{family} here - landed safely, the flight was fine. Will call tomorrow. Love you.",
    "Subject: Office raffle results\n\nThe winner of this year's charity raffle is {sender}, who wins a hamper. Thanks to everyone who bought tickets - we raised {money} for the food bank.",
    "Hi {recipient}, your payslip for this month is now available in the HR portal. Contact payroll if anything looks wrong.",
    "Subject: Lunch on {weekday}?\n\nHi {recipient}, a few of us are going to the new noodle place at {time}. Want to join?",
    "Your {shop} receipt: order {num}, total {money}. Thanks for shopping with us. Returns are accepted within 30 days.",
    "Subject: Agenda for {weekday}\n\nHi team, I've added the agenda to {ham_link}. Please add your updates on the {project} by end of day. - {sender}",
    "Don't forget the school trip form is due {weekday}. I've signed it, it's on the fridge. - {family}",
    "Subject: Your {carrier} delivery is on its way\n\nParcel {tracking} from {shop} will arrive {weekday} between {time} and 18:00. No action needed.",
]
HAM_HELDOUT_TEMPLATES = [
    "Subject: Welcome to {newsletter}\n\nYou're now subscribed. Expect one email a week, every {weekday}. You can change your preferences at any time.",
    "Hi {recipient}, I've approved your expense claim for {money}. It will be paid with next month's salary. - {sender}",
    "Subject: Can we move our 1:1?\n\nHi {recipient}, something came up on {weekday}. Could we do {time} the next day instead? - {sender}",
    "Happy birthday sweetheart! Hope you have a lovely day. Lots of love from {family}.",
    "Subject: Contract renewal\n\nHi {recipient}, our maintenance contract renews next month at the same rate of {money} a year. Let me know if you want to change anything. Regards, {sender}",
]


def _spam_fill(slot: str, rng: random.Random) -> str:
    table = {
        "prize": PRIZES, "bank": BANKS, "coin": COINS, "drug": DRUGS, "spam_link": SPAM_LINKS,
        "recipient": RECIPIENTS, "sender": SENDERS, "family": FAMILY, "project": PROJECTS,
        "weekday": WEEKDAYS, "time": TIMES, "carrier": CARRIERS, "shop": SHOPS,
        "newsletter": NEWSLETTERS, "ham_link": HAM_LINKS,
    }
    if slot in table:
        return rng.choice(table[slot])
    if slot == "money":
        return _money(rng)
    if slot == "num":
        return str(rng.randint(1000, 99999))
    if slot == "tracking":
        return "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ0123456789") for _ in range(12))
    raise KeyError(slot)


def render_spam(template: str, rng: random.Random) -> str:
    cache: dict[str, str] = {}  # the same slot twice in one message gets the same value (invoice {num} ... {num})

    def sub(m: re.Match) -> str:
        slot = m.group(1)
        if slot not in cache:
            cache[slot] = _spam_fill(slot, rng)
        return cache[slot]

    return SLOT_RE.sub(sub, template)


def make_spam(seed: int, n_train: int, n_heldout: int) -> tuple[list[dict], list[dict], dict]:
    rng = random.Random(seed)
    seen: set[str] = set()

    n_novel = 0

    def build(n: int, pools: dict[str, tuple[list[str], list[str]]], p_novel: float) -> list[dict]:
        nonlocal n_novel
        rows = []
        for i in range(n):
            label = "spam" if i % 2 == 0 else "ham"
            base, novel = pools[label]
            use_novel = bool(novel) and rng.random() < p_novel
            n_novel += use_novel
            tpl_pool = novel if use_novel else base
            while True:
                text = render_spam(rng.choice(tpl_pool), rng)
                if text not in seen:
                    break
            seen.add(text)
            rows.append({"text": text, "label": label})
        rng.shuffle(rows)
        return rows

    train = build(n_train, {"spam": (SPAM_TEMPLATES, []), "ham": (HAM_TEMPLATES, [])}, 0.0)
    heldout = build(n_heldout, {"spam": (SPAM_TEMPLATES, SPAM_HELDOUT_TEMPLATES),
                                "ham": (HAM_TEMPLATES, HAM_HELDOUT_TEMPLATES)}, 0.4)
    stats = {"heldout_from_heldout_only_templates": n_novel,
             "heldout_spam": sum(r["label"] == "spam" for r in heldout)}
    return train, heldout, stats


# --------------------------------------------------------------------------------------------------
# chat

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Portugal", "Lisbon"),
    ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"), ("Argentina", "Buenos Aires"),
    ("Canada", "Ottawa"), ("Australia", "Canberra"), ("Kenya", "Nairobi"), ("Egypt", "Cairo"),
    ("Nigeria", "Abuja"), ("South Korea", "Seoul"), ("Mexico", "Mexico City"), ("Peru", "Lima"),
    ("Chile", "Santiago"), ("Colombia", "Bogota"), ("Russia", "Moscow"), ("Turkey", "Ankara"),
    ("Greece", "Athens"), ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"), ("Poland", "Warsaw"), ("Austria", "Vienna"), ("Switzerland", "Bern"),
    ("the Netherlands", "Amsterdam"), ("Belgium", "Brussels"), ("Ireland", "Dublin"), ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"), ("the Philippines", "Manila"), ("Ghana", "Accra"), ("Ethiopia", "Addis Ababa"),
    ("Morocco", "Rabat"), ("Hungary", "Budapest"), ("the Czech Republic", "Prague"), ("Iceland", "Reykjavik"),
    ("New Zealand", "Wellington"), ("Cuba", "Havana"), ("Iran", "Tehran"), ("Iraq", "Baghdad"),
    ("Saudi Arabia", "Riyadh"), ("Pakistan", "Islamabad"), ("Bangladesh", "Dhaka"), ("Nepal", "Kathmandu"),
    ("Ukraine", "Kyiv"), ("Romania", "Bucharest"), ("Bulgaria", "Sofia"), ("Serbia", "Belgrade"),
    ("Croatia", "Zagreb"), ("Uruguay", "Montevideo"), ("Venezuela", "Caracas"), ("Senegal", "Dakar"),
    ("Uganda", "Kampala"), ("Zimbabwe", "Harare"), ("Malaysia", "Kuala Lumpur"), ("the United Kingdom", "London"),
    ("Estonia", "Tallinn"), ("Latvia", "Riga"), ("Lithuania", "Vilnius"), ("Jamaica", "Kingston"),
    ("Mongolia", "Ulaanbaatar"), ("Qatar", "Doha"), ("Jordan", "Amman"), ("Lebanon", "Beirut"),
]
DEFINITIONS = [
    ("photosynthesis", "Photosynthesis is the process by which plants use sunlight, water and carbon dioxide to make sugar and release oxygen."),
    ("inflation", "Inflation is the general rise in prices over time, which reduces what a unit of money can buy."),
    ("an algorithm", "An algorithm is a finite sequence of well-defined steps for solving a problem or performing a task."),
    ("gravity", "Gravity is the force by which masses attract one another; it keeps us on the ground and planets in orbit."),
    ("a prime number", "A prime number is a whole number greater than 1 whose only divisors are 1 and itself."),
    ("democracy", "Democracy is a system of government in which citizens choose their leaders, usually through free elections."),
    ("an atom", "An atom is the smallest unit of a chemical element, made of a nucleus of protons and neutrons surrounded by electrons."),
    ("evaporation", "Evaporation is the process by which a liquid turns into a gas, usually when it is heated."),
    ("a metaphor", "A metaphor is a figure of speech that describes something by calling it something else, such as 'time is money'."),
    ("an ecosystem", "An ecosystem is a community of living things interacting with each other and their physical environment."),
    ("a noun", "A noun is a word that names a person, place, thing or idea."),
    ("a verb", "A verb is a word that describes an action, event or state, such as 'run' or 'be'."),
    ("interest", "Interest is the money paid for borrowing money, usually a percentage of the amount borrowed."),
    ("a vaccine", "A vaccine is a preparation that trains the immune system to recognise and fight a specific disease."),
    ("climate", "Climate is the average weather of a region measured over many years."),
    ("a fraction", "A fraction represents a part of a whole, written as one number over another, such as 3/4."),
    ("a peninsula", "A peninsula is a piece of land surrounded by water on three sides."),
    ("an enzyme", "An enzyme is a protein that speeds up a specific chemical reaction in living things."),
    ("a budget", "A budget is a plan that sets out expected income and spending over a period of time."),
    ("osmosis", "Osmosis is the movement of water through a membrane from a weaker solution to a stronger one."),
    ("a database", "A database is an organised collection of data that can be stored, searched and updated easily."),
    ("an invoice", "An invoice is a document from a seller listing goods or services provided and the amount the buyer owes."),
    ("a compiler", "A compiler is a program that translates source code into machine code or another lower-level form."),
    ("friction", "Friction is the force that resists motion between two surfaces in contact."),
    ("a volcano", "A volcano is an opening in the Earth's crust through which molten rock, ash and gases escape."),
    ("a synonym", "A synonym is a word that means the same or nearly the same as another word."),
    ("an antonym", "An antonym is a word with the opposite meaning to another word, such as 'hot' and 'cold'."),
    ("a mammal", "A mammal is a warm-blooded animal with hair that feeds its young with milk."),
    ("a recession", "A recession is a significant decline in economic activity lasting months, often two quarters of falling output."),
    ("a hypothesis", "A hypothesis is a testable explanation proposed as a starting point for investigation."),
    ("an orbit", "An orbit is the curved path of an object around a star, planet or moon."),
    ("a carbohydrate", "A carbohydrate is a nutrient made of sugars, starches or fibre that gives the body energy."),
    ("encryption", "Encryption is the process of scrambling data so that only someone with the right key can read it."),
    ("a continent", "A continent is one of the Earth's seven large landmasses, such as Africa or Asia."),
    ("erosion", "Erosion is the gradual wearing away of rock or soil by water, wind or ice."),
    ("a dividend", "A dividend is a share of a company's profit paid out to its shareholders."),
    ("a haiku", "A haiku is a short Japanese poem of three lines with five, seven and five syllables."),
    ("a tariff", "A tariff is a tax that a government places on imported goods."),
    ("bandwidth", "Bandwidth is the maximum amount of data a network connection can carry per second."),
    ("a glacier", "A glacier is a large, slow-moving mass of ice formed from compacted snow."),
]
# (from unit, to unit, factor); temperature handled separately.
CONVERSIONS = [
    ("kilometres", "metres", 1000.0), ("metres", "centimetres", 100.0), ("kilograms", "grams", 1000.0),
    ("hours", "minutes", 60.0), ("minutes", "seconds", 60.0), ("inches", "centimetres", 2.54),
    ("miles", "kilometres", 1.609344), ("pounds", "kilograms", 0.45359237), ("litres", "millilitres", 1000.0),
    ("feet", "metres", 0.3048), ("days", "hours", 24.0), ("gigabytes", "megabytes", 1000.0),
]

ARITH_Q = {
    "train": ["What is {a} {op} {b}?", "Calculate {a} {op} {b}.", "{a} {op} {b} = ?"],
    "heldout": ["Quick question: what's {a} {op} {b}?"],
}
CAPITAL_Q = {
    "train": ["What is the capital of {c}?", "Which city is the capital of {c}?"],
    "heldout": ["Name the capital city of {c}."],
}
CONV_Q = {
    "train": ["How many {to} are in {x} {frm}?", "Convert {x} {frm} to {to}."],
    "heldout": ["What is {x} {frm} in {to}?"],
}
TEMP_Q = {
    "train": ["Convert {x} degrees Celsius to Fahrenheit."],
    "heldout": ["What is {x} C in Fahrenheit?"],
}
DEF_Q = {
    "train": ["What is {w}?", "Define {w}.", "Explain {w} in one sentence."],
    "heldout": ["Briefly, what is {w}?"],
}


def _question(rng: random.Random, forms: dict[str, list[str]], heldout: bool) -> str:
    if heldout and rng.random() < 0.4:
        return rng.choice(forms["heldout"])
    return rng.choice(forms["train"])


def chat_item(rng: random.Random, heldout: bool, capitals: list, definitions: list) -> tuple[str, str]:
    kind = rng.choices(["arith", "capital", "conv", "temp", "def"], weights=[3, 3, 3, 1, 3])[0]
    if kind == "arith":
        op = rng.choice(["+", "-", "x"])
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        if op == "-" and b > a:
            a, b = b, a
        c = a + b if op == "+" else a - b if op == "-" else a * b
        q = _question(rng, ARITH_Q, heldout).format(a=a, op=op, b=b)
        return q, f"{a} {op} {b} = {c}."
    if kind == "capital":
        country, city = rng.choice(capitals)
        q = _question(rng, CAPITAL_Q, heldout).format(c=country)
        return q, f"The capital of {country} is {city}."
    if kind == "conv":
        frm, to, factor = rng.choice(CONVERSIONS)
        x = rng.choice([0.5, 1.5, 2, 3, 4, 5, 7, 10, 12, 25, 2.5, 3.5, 8, 15, 20])
        q = _question(rng, CONV_Q, heldout).format(x=fmt_num(x), frm=frm, to=to)
        return q, f"{fmt_num(x)} {frm} is {fmt_num(x * factor)} {to}."
    if kind == "temp":
        x = rng.choice(range(-20, 45, 5))
        q = _question(rng, TEMP_Q, heldout).format(x=x)
        return q, f"{x} degrees Celsius is {fmt_num(x * 9 / 5 + 32)} degrees Fahrenheit."
    word, definition = rng.choice(definitions)
    q = _question(rng, DEF_Q, heldout).format(w=word)
    q = q[0].upper() + q[1:]
    return q, definition


def make_chat(seed: int, n_train: int, n_heldout: int) -> tuple[list[dict], list[dict], dict]:
    rng = random.Random(seed)
    cap_train, cap_held = split_pool(CAPITALS, 5)
    def_train, def_held = split_pool(DEFINITIONS, 5)
    seen: set[str] = set()

    def build(n: int, heldout: bool) -> list[dict]:
        rows = []
        while len(rows) < n:
            # held-out countries and words are never in training; held-out arithmetic and conversions
            # are only new instances (distinct questions).
            caps = cap_held if heldout and rng.random() < 0.7 else cap_train
            defs = def_held if heldout and rng.random() < 0.7 else def_train
            q, a = chat_item(rng, heldout, caps, defs)
            if q in seen:
                continue
            assert len(a.split()) < 30, a
            seen.add(q)
            rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
        return rows

    train = build(n_train, heldout=False)
    heldout = build(n_heldout, heldout=True)
    return train, heldout, {}


# --------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "examples" / "data"))
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    tasks = {
        "ner": make_ner(args.seed, 1200, 300),
        "spam": make_spam(args.seed + 1, 1000, 250),
        "chat": make_chat(args.seed + 2, 200, 50),
    }
    for name, (train, heldout, stats) in tasks.items():
        write_jsonl(out / f"{name}.train.jsonl", train)
        write_jsonl(out / f"{name}.heldout.jsonl", heldout)
        extra = "  ".join(f"{k}={v}" for k, v in stats.items())
        print(f"{name:5s} train={len(train):5d} heldout={len(heldout):4d}  {extra}".rstrip())
    total = sum(p.stat().st_size for p in out.glob("*.jsonl"))
    print(f"wrote {out} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
