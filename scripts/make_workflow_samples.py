"""Write small synthetic inputs for the coral and natural_reasoning workflows.

    python scripts/make_workflow_samples.py  # tests/data/{mmlu_pro,web_docs}_sample.jsonl (40 rows each)
    python scripts/make_workflow_samples.py --rows 10000 --out-dir /tmp/big   # more rows, cycled with new ids

The rows have the shape of the real datasets (MMLU-Pro: question_id,
question, options, answer, answer_index, category; web documents: id, url,
text) but are written here: there is no network access to fetch the real ones.
"""

from __future__ import annotations

import argparse
import json
import random
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any

LETTERS = string.ascii_uppercase

FACTS: list[tuple[str, str, list[str], str]] = [
    ("physics", "Which quantity is conserved in a perfectly elastic collision but not in a perfectly inelastic one?",
     ["Kinetic energy", "Momentum", "Mass", "Electric charge"], "Kinetic energy"),
    ("chemistry", "What is the pH of a 0.001 M solution of hydrochloric acid at 25 °C?",
     ["1", "2", "3", "4", "7", "11"], "3"),
    ("biology", "Which organelle is the main site of ATP synthesis in eukaryotic cells?",
     ["Ribosome", "Golgi apparatus", "Mitochondrion", "Lysosome", "Nucleus"], "Mitochondrion"),
    ("economics",
     "If the price elasticity of demand is -2 and the price rises by 5%, quantity demanded changes by about",
     ["-2.5%", "-5%", "-10%", "+10%", "-20%", "0%"], "-10%"),
    ("computer science", "What is the worst-case time complexity of binary search on a sorted array of n elements?",
     ["O(1)", "O(log n)", "O(n)", "O(n log n)", "O(n^2)"], "O(log n)"),
    ("mathematics", "How many edges does a complete graph on 6 vertices have?",
     ["12", "15", "18", "30", "36", "6"], "15"),
    ("physics", "A 2 kg mass hangs from a spring with k = 200 N/m. What is the angular frequency of its oscillation?",
     ["5 rad/s", "10 rad/s", "20 rad/s", "100 rad/s", "0.1 rad/s"], "10 rad/s"),
    ("law", "Under the common law, which element is NOT required to form a contract?",
     ["Offer", "Acceptance", "Consideration", "A written document", "Intention to create legal relations"],
     "A written document"),
    ("engineering", "A resistor of 10 ohm carries 2 A. What power does it dissipate?",
     ["5 W", "20 W", "40 W", "80 W", "0.2 W"], "40 W"),
    ("history", "The Treaty of Westphalia (1648) ended which conflict?",
     ["The Hundred Years' War", "The Thirty Years' War", "The Seven Years' War", "The War of the Roses"],
     "The Thirty Years' War"),
]


def mmlu_pro_rows(n: int, seed: int = 0) -> Iterator[dict[str, Any]]:
    rng = random.Random(seed)
    for i in range(n):
        if i % 4 == 0:
            category, question, options, right = FACTS[(i // 4) % len(FACTS)]
            options = list(options)
        else:
            category, question, options, right = _arithmetic(rng)
        rng.shuffle(options)
        index = options.index(right)
        yield {"question_id": i, "question": question, "options": options, "answer": LETTERS[index],
               "answer_index": index, "cot_content": "", "category": category, "src": "synthetic"}


def _arithmetic(rng: random.Random) -> tuple[str, str, list[str], str]:
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.randint(12, 99), rng.randint(12, 99)
        right = a * b
        q = f"What is {a} multiplied by {b}?"
    elif kind == 1:
        km, h = rng.randint(60, 600), rng.choice([2, 3, 4, 5, 6])
        right = round(km / h, 1)
        q = f"A train covers {km} km in {h} hours at constant speed. What is its speed in km/h?"
    else:
        p, r, years = rng.choice([1000, 2000, 5000]), rng.choice([2, 4, 5, 10]), rng.choice([2, 3])
        right = round(p * (1 + r / 100) ** years - p, 2)
        q = f"What compound interest does {p} dollars earn at {r}% per year, compounded yearly, over {years} years?"
    wrong: set[Any] = set()
    while len(wrong) < 9:
        delta = rng.choice([-1, 1]) * rng.randint(1, max(12, int(abs(right) * 0.3)))  # >= 9 distinct values
        candidate = round(right + delta, 1) if isinstance(right, float) else right + delta
        if candidate != right:
            wrong.add(candidate)
    return "mathematics", q, [str(x) for x in [right, *wrong]], str(right)


REASONING_DOCS = [
    "Solving a classic mixing problem. A tank holds 100 litres of brine with 5 kg of salt. Fresh water flows in at "
    "2 litres per minute and the well-mixed solution flows out at the same rate. Let S(t) be the salt in the tank. "
    "Then dS/dt = -2 S / 100, so S(t) = 5 e^(-t/50). After 50 minutes the tank holds 5/e, about 1.84 kg of salt. "
    "The key step is noticing that the concentration is S/100 at every instant because the volume stays constant.",
    "Why does a heavier pendulum not swing faster? For small angles the restoring torque is -m g L sin(theta), and "
    "the moment of inertia is m L^2. Dividing, the mass cancels: theta'' = -(g/L) theta. The period is therefore "
    "2 pi sqrt(L/g), independent of mass. For L = 1 m on Earth this gives about 2.01 seconds.",
    "Supply and demand worked example. Demand is Q = 100 - 2P and supply is Q = 20 + 2P. Setting them equal gives "
    "100 - 2P = 20 + 2P, so P = 20 and Q = 60. If a tax of 4 per unit is levied on sellers, supply becomes "
    "Q = 20 + 2(P - 4), the new equilibrium price is 22, and buyers bear half the tax because the slopes are equal.",
    "Proof that the square root of 2 is irrational. Suppose sqrt(2) = p/q in lowest terms. Then p^2 = 2 q^2, so p^2 "
    "is even and hence p is even; write p = 2k. Then 4k^2 = 2q^2, so q^2 = 2k^2 and q is even too, contradicting "
    "lowest terms. The same argument works for any prime in place of 2.",
    "Estimating the energy in a lightning bolt. A typical stroke moves about 15 coulombs across a potential "
    "difference of roughly 100 million volts. The energy is charge times voltage, 1.5 billion joules, which is about "
    "417 kilowatt-hours, enough to run a household for a few weeks if it could be captured.",
    "Counting lattice paths. To go from (0,0) to (4,3) with unit steps right or up, you make 7 steps of which 3 are "
    "up. Each path is a choice of which 3 steps go up, so there are C(7,3) = 35 paths. If the point (2,1) must be "
    "avoided, subtract the C(3,1) * C(4,2) = 18 paths through it, leaving 17.",
    "Designing a voltage divider. To get 3.3 V from a 5 V rail with a load that draws negligible current, choose "
    "R2/(R1 + R2) = 0.66. With R2 = 20 kilo-ohm, R1 is about 10.3 kilo-ohm. If the load draws current, the output "
    "sags, which is why a regulator is preferred when the load varies.",
    "Bayes' rule in medical testing. A disease affects 1% of people. A test detects it 99% of the time and gives a "
    "false positive 5% of the time. The probability of disease given a positive test is 0.99*0.01 / (0.99*0.01 + "
    "0.05*0.99) = 0.0099 / 0.0594, about 16.7%, far lower than most people guess.",
    "Enzyme kinetics. With Michaelis-Menten kinetics, v = Vmax [S] / (Km + [S]). When [S] equals Km the rate is half "
    "of Vmax. If Km = 2 mM and Vmax = 10 umol/min, then at [S] = 6 mM the rate is 10*6/8 = 7.5 umol/min. A "
    "competitive inhibitor raises the apparent Km without changing Vmax.",
    "Amortised analysis of a dynamic array. Doubling capacity when full means n appends cost at most n writes plus "
    "copies of 1 + 2 + 4 + ... + n/2 < n elements, so the total is under 3n and each append is O(1) amortised. "
    "Growing by a constant amount instead would make the total quadratic.",
]
NON_ENGLISH_DOCS = [
    "Die Ableitung der Funktion f(x) = x^2 ist f'(x) = 2x. Daraus folgt, dass die Steigung der Parabel an der Stelle "
    "x = 3 genau 6 beträgt. Dieses Ergebnis erhält man auch über den Grenzwert des Differenzenquotienten.",
    "La vitesse moyenne d'un cycliste qui parcourt 30 kilomètres en une heure et demie est de 20 kilomètres par "
    "heure. Pour aller deux fois plus vite sur le retour, il devrait rouler à 40 kilomètres par heure.",
    "El teorema de Pitágoras establece que en un triángulo rectángulo el cuadrado de la hipotenusa es igual a la "
    "suma de los cuadrados de los catetos. Si los catetos miden 3 y 4, la hipotenusa mide 5.",
    "Il prezzo di equilibrio si ottiene uguagliando domanda e offerta. Se la domanda è Q = 50 - P e l'offerta è "
    "Q = 2P - 10, allora il prezzo di equilibrio è 20 e la quantità scambiata è 30.",
    "Het volume van een bol met straal r is vier derde maal pi maal r tot de derde macht. Een bol met straal "
    "3 centimeter heeft dus een volume van ongeveer 113 kubieke centimeter.",
]
BOILERPLATE_DOCS = [
    "Home | About us | Contact | Careers. We use cookies to improve your experience. By continuing to browse the "
    "site you agree to our use of cookies. Accept all cookies. Manage preferences. Privacy policy. Terms of use.",
    "BIG SUMMER SALE! Up to 70% off on shoes, bags and accessories. Free shipping on orders over 50 dollars. "
    "Sign up for our newsletter and get an extra 10% off your first order. Limited time only, shop now!",
    "Top 10 celebrity outfits of the week. Number one: a stunning red gown. Number two: a bold denim look. Click "
    "through the gallery to see all of them and vote for your favourite in the comments below.",
    "Opening hours: Monday to Friday 9 am to 5 pm, Saturday 10 am to 2 pm, closed on Sundays and public holidays. "
    "Parking is available behind the building. Call us for appointments.",
]


def web_doc_rows(n: int, seed: int = 0) -> Iterator[dict[str, Any]]:
    """Reasoning documents (about 60%), other languages (20%), boilerplate (20%), plus an empty one."""
    pool = ([("reasoning", d) for d in REASONING_DOCS] * 2 + [("other_language", d) for d in NON_ENGLISH_DOCS]
            + [("boilerplate", d) for d in BOILERPLATE_DOCS])
    rng = random.Random(seed)
    for i in range(n):
        kind, text = pool[i % len(pool)] if i != len(pool) else ("empty", "")
        yield {"id": f"doc-{i:06d}", "url": f"https://example.org/{kind}/{i}", "kind": kind,
               "text": text if kind != "reasoning" else text + f" (Page {rng.randint(1, 999)}.)"}


def write_jsonl(path: Path, rows: Iterator[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=40, help="rows per file")
    parser.add_argument("--out-dir", default=str(Path(__file__).resolve().parents[1] / "tests" / "data"))
    args = parser.parse_args()
    out = Path(args.out_dir)
    print(write_jsonl(out / "mmlu_pro_sample.jsonl", mmlu_pro_rows(args.rows)))
    print(write_jsonl(out / "web_docs_sample.jsonl", web_doc_rows(args.rows)))


if __name__ == "__main__":
    main()
