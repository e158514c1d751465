"""The offline demo's corpus: a deterministic generator of simple children's stories.

`dataset_name: "octo-demo"` in a config reads this corpus and `tokenizer_name: "octo-demo"` a
byte-level BPE of DEMO_VOCAB_SIZE tokens trained on it; both are built on first use under
{data_cache_dir}/demo/ (corpus-{version}/train.jsonl and validation.jsonl, tokenizer-{version}-
{vocab}/) and reused afterwards. The version is a hash of this file, so editing the generator
rebuilds them (and the pre-tokenized cache, whose key includes it). Nothing generated is committed.

Each story draws a plot (ten kinds: a lost toy, a new friend, sharing, a fear, building, a rainy
picnic, helping a neighbour, a race, a birthday, a discovery) and fills it with a hero and a
friend (name, kind, pronouns, trait), a place with its features, objects with colours, foods and
numbers, each sentence from a few phrasings. Within a story the names, pronouns, colours, objects
and counts stay consistent, so there is structure to learn beyond word statistics: the small demo
model learns the phrasing first, then to carry a name or a colour from the start of a story to
its end.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from pathlib import Path

from train.data.bpe import train_tokenizer
from train.data.cache import build_once

DEMO_VERSION = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]
DEMO_VOCAB_SIZE = 2048
N_TRAIN, N_VALID = 24_000, 600
TRAIN_SEED, VALID_SEED = 1, 2

GIRLS = """Lily Mia Emma Anna Sara Lucy Zoe Ella Ruby Grace Amy Nora Rosa Kim Maya Ivy Lena Jane
Sophie Chloe Daisy Alice Molly Hana Tess Julia Nina Clara Leah Eva""".split()
BOYS = """Tom Ben Max Sam Leo Jack Tim Finn Noah Luke Owen Eli Jake Ryan Adam Theo Hugo Omar Ned
Paul Toby Oscar Felix Henry Milo Kai Luis Ravi Dan Joe""".split()
ANIMALS = "cat dog bunny bear fox duck mouse owl frog puppy kitten pig lamb squirrel turtle".split()
ANIMAL_ADJ = "little small fluffy brown white gray tiny spotted".split()
TRAITS = "kind brave shy curious happy clever gentle funny cheerful busy".split()
LIKES = [
    "play outside",
    "draw pictures",
    "sing songs",
    "read books",
    "run in the grass",
    "look at the clouds",
    "build things",
    "dance",
    "help others",
    "splash in puddles",
]
COLORS = "red blue green yellow pink purple orange white black shiny".split()
OBJECTS = [
    "ball",
    "kite",
    "hat",
    "book",
    "toy car",
    "doll",
    "blanket",
    "cup",
    "shell",
    "key",
    "drum",
    "boat",
    "balloon",
    "teddy bear",
    "scarf",
    "crayon",
    "bucket",
    "train",
    "robot",
    "bell",
]
PLACES = {
    "park": ["the big tree", "the bench", "the slide", "the swings", "the bushes"],
    "forest": ["a tall tree", "a big rock", "the ferns", "a fallen log", "the mushrooms"],
    "beach": ["the sand", "a big rock", "the waves", "the towels", "a pile of shells"],
    "garden": ["the roses", "the fence", "the big pot", "the carrots", "the hose"],
    "farm": ["the barn", "the hay", "the fence", "the tractor", "the chicken house"],
    "school": ["the desk", "the bookshelf", "the door", "the coat rack", "the big window"],
    "lake": ["the dock", "the reeds", "a big rock", "the boat", "the tall grass"],
    "hill": ["a big rock", "the flowers", "an old tree", "the path", "the tall grass"],
    "zoo": ["the gate", "the bench", "the pond", "the map", "the ice cream cart"],
    "library": ["the shelves", "the big chair", "the desk", "the rug", "the window"],
    "backyard": ["the tree house", "the sandbox", "the fence", "the swing", "the flower bed"],
    "town square": ["the fountain", "the bench", "the lamp post", "the flower stand", "the steps"],
}
PARENTS = [("mom", "she"), ("dad", "he"), ("grandma", "she"), ("grandpa", "he")]
FOODS = "apple cookie cupcake banana orange muffin sandwich pear plum strawberry".split()
FEELINGS_BAD = "sad scared lonely worried upset".split()
NUMBERS = ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
ORDINALS = dict(zip(NUMBERS, "second third fourth fifth sixth seventh eighth ninth tenth".split()))
GAMES = ["tag", "hide and seek", "catch", "jump rope", "a game of pretend", "ball"]
FEARS = [
    (
        "the dark",
        "When the lights went out at night, {n} hid under the blanket.",
        "The dark is just the day taking a rest. Your room is the same room.",
    ),
    (
        "thunder",
        "When the sky went boom, {n} ran to {p}.",
        "Thunder is just the sound the clouds make. It can not hurt you.",
    ),
    (
        "the big slide",
        "Every time {n} climbed the steps, {s} came back down.",
        "I will wait for you at the bottom. You can do it.",
    ),
    (
        "deep water",
        "{N} always stayed where the water was low.",
        "I will hold your hand. We will go one step at a time.",
    ),
    (
        "the big dog next door",
        "When the dog barked, {n} ran inside.",
        "The dog is only saying hello. Let us go and meet him together.",
    ),
]
BUILDS = [
    ("a sandcastle", "beach", "a big wave came and washed it away"),
    ("a tower of blocks", "school", "the tower wobbled and fell down"),
    ("a fort of pillows", "library", "the pillows slid and the fort fell flat"),
    ("a snowman", "park", "the sun came out and the snowman got smaller"),
    ("a little boat of sticks", "lake", "the wind blew it over"),
    ("a bird house", "backyard", "the roof fell off"),
]
GIFTS = ["a card", "a drawing", "a small cake", "a paper crown", "a necklace of beads", "a song"]


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


class _Char:
    """A story character: name, what it is, pronouns, a trait; consistent through the story."""

    def __init__(self, rng: random.Random, avoid: str = "") -> None:
        while True:
            self.animal = rng.random() >= 0.65
            if not self.animal:
                girl = rng.random() < 0.5
                self.name = rng.choice(GIRLS if girl else BOYS)
                self.kind = "girl" if girl else "boy"
                self.desc = f"a {rng.choice(['little', 'young', 'small'])} {self.kind}"
            else:
                girl = rng.random() < 0.5
                self.kind = rng.choice(ANIMALS)
                self.name = rng.choice(GIRLS if girl else BOYS)
                self.desc = _a(f"{rng.choice(ANIMAL_ADJ)} {self.kind}")
            if self.name != avoid:
                break
        self.he, self.his, self.him = ("she", "her", "her") if girl else ("he", "his", "him")
        self.He, self.His = self.he.capitalize(), self.his.capitalize()
        self.trait = rng.choice(TRAITS)
        self.likes = rng.choice(LIKES)

    def intro(self, rng: random.Random) -> str:
        n = self.name
        return (
            rng.choice(
                [
                    f"Once upon a time, there was {self.desc} named {n}.",
                    f"Once upon a time, in a small town, there lived {self.desc} named {n}.",
                    f"There was once {self.desc} called {n}.",
                    f"Once upon a time, {self.desc} named {n} lived near the "
                    f"{rng.choice(list(PLACES))}.",
                ]
            )
            + " "
            + rng.choice(
                [
                    f"{n} was very {self.trait} and loved to {self.likes}.",
                    f"{self.He} was {self.trait}, and {self.he} loved to {self.likes}.",
                    f"Every day, {n} liked to {self.likes}.",
                ]
            )
        )


def _lost(rng, h, f, place, feats):
    color, obj = rng.choice(COLORS), rng.choice(OBJECTS)
    x, y, z = rng.sample(feats, 3)
    return [
        f"{h.name} had {_a(color)} {obj}. It was {h.his} favorite {obj} in the whole world.",
        f"One day, {h.name} took the {color} {obj} to the {place}. {h.He} played with it near {x}.",
        f"But when it was time to go home, the {obj} was gone! {h.name} felt very "
        f"{rng.choice(FEELINGS_BAD)}. {h.He} looked near {x}. {h.He} looked by {y}. "
        f"But {h.he} could not find the {color} {obj}.",
        f'Then {h.his} friend {f.name} came by. "Why are you sad, {h.name}?" asked {f.name}. '
        f'"I lost my {color} {obj}," said {h.name}. "I will help you look," said {f.name}.',
        rng.choice(
            [
                f"They looked together, and {f.name} saw something {color} next to {z}. "
                f"It was the {obj}!",
                f"They walked to {z}, and there was the {color} {obj}!",
            ]
        ),
        f'{h.name} hugged {f.name}. "Thank you!" {h.he} said. '
        + rng.choice(
            [
                f"From that day on, {h.name} always kept {h.his} {obj} close.",
                f"After that day, {h.name} and {f.name} were best friends.",
            ]
        ),
    ]


def _friend(rng, h, f, place, feats):
    x = rng.choice(feats)
    feel = rng.choice(["sad", "lonely", "scared"])
    game = rng.choice(GAMES)
    lost = rng.random() < 0.5
    mom = f"a big {f.kind}" if f.animal else f"a woman in {_a(rng.choice(COLORS))} coat"
    out = [
        f"One {rng.choice(['sunny', 'windy', 'cold', 'warm'])} morning, {h.name} went to the "
        f"{place}. Near {x}, {h.he} saw {f.desc} sitting all alone. {f.He} looked {feel}.",
        f'"Hello," said {h.name}. "My name is {h.name}. Why are you {feel}?"',
    ]
    if lost:
        out += [
            f'"I am {f.name}, and I can not find my mom," said the {f.kind}.',
            f'"Do not worry," said {h.name}. "I will help you find her."',
            f"They looked all around the {place}. At last they saw {mom} near "
            f"{rng.choice(feats)}. It was {f.name}'s mom! {f.name} ran to her and smiled.",
        ]
    else:
        out += [
            f'"I am {f.name}, and I have no one to play with," said the {f.kind}.',
            f'"You can play with me!" said {h.name}. "Do you like {game}?"',
            f"{f.name} smiled. They played {game} until the sun went down.",
        ]
    out.append(
        rng.choice(
            [
                f"{h.name} and {f.name} became good friends and met at the {place} every day.",
                f"That day, {h.name} learned that a kind word can make a new friend.",
            ]
        )
    )
    return out


def _share(rng, h, f, place, feats):
    parent, _ = rng.choice(PARENTS)
    k = rng.randint(1, 4)
    food = rng.choice(FOODS)
    return [
        f"One day, {h.name}'s {parent} gave {h.him} {NUMBERS[2 * k - 2]} {food}s.",
        f"{h.name} took the {food}s to the {place}. There {h.he} met {f.name}, who had no "
        f"{food}s at all.",
        f'"Can I have one?" asked {f.name}. {h.name} looked at the {food}s and thought for a '
        f"moment.",
        f"Then {h.he} gave {f.name} {NUMBERS[k - 2] if k > 1 else 'one'} "
        f"{food}{'s' if k > 1 else ''}. Now they each had {NUMBERS[k - 2] if k > 1 else 'one'}.",
        f"The {food}s were {rng.choice(['sweet', 'yummy', 'very good'])}. When {h.name} came "
        f"home, {h.his} {parent} was proud of {h.him} for sharing.",
        rng.choice(["Sharing makes everyone happy.", f"{h.name} was happy, and so was {f.name}."]),
    ]


def _fear(rng, h, f, place, feats):
    fear, scene, comfort = rng.choice(FEARS)
    parent, _ = rng.choice(PARENTS)
    return [
        f"{h.name} was afraid of {fear}.",
        scene.format(n=h.name, N=h.name, p=f"{h.his} {parent}", s=h.he),
        f'One day, {h.his} {parent} sat down next to {h.him}. "Do not be scared," said '
        f'{parent.capitalize()}. "{comfort}"',
        f"{h.name} took a deep breath. {h.He} tried one more time, and it was not so bad. "
        f"Soon {h.name} was not afraid of {fear} anymore.",
        rng.choice([f"{h.He} felt brave and proud.", f"{h.name} smiled. {h.He} was brave now."]),
    ]


def _build(rng, h, f, place, feats):
    thing, where, problem = rng.choice(BUILDS)
    return [
        f"One day, {h.name} and {f.name} went to the {where}. They wanted to build {thing}.",
        f"They worked all morning. {h.name} {rng.choice(['carried', 'found', 'brought'])} the "
        f"pieces, and {f.name} put them in place. It was the best {thing.split(' ', 1)[1]} ever.",
        f"But then {problem}. {f.name} was {rng.choice(FEELINGS_BAD)}.",
        f'"Let us try again," said {h.name}. "We can make it even better."',
        f"So they built {thing} again, bigger and stronger than before. This time it stayed.",
        f"{h.name} and {f.name} smiled. Working together was fun.",
    ]


def _picnic(rng, h, f, place, feats):
    parent, _ = rng.choice(PARENTS)
    foods = rng.sample(FOODS, 2)
    game = rng.choice(GAMES)
    return [
        f"{h.name} and {h.his} {parent} wanted to have a picnic at the {place}. They packed "
        f"{foods[0]}s and {foods[1]}s in a big basket.",
        f"But when they opened the door, it was raining. {h.name} was {rng.choice(FEELINGS_BAD)}.",
        f'"We can have a picnic inside," said {h.his} {parent}. They put a blanket on the floor '
        f"and ate the {foods[0]}s. Then they played {game}.",
        f"After a while, the rain stopped. {h.name} looked out of the window and saw a big "
        f"rainbow over the {place}.",
        f"They took the basket and ate the {foods[1]}s under the rainbow. It was the best picnic.",
    ]


def _help(rng, h, f, place, feats):
    old = rng.choice(["Mrs. Brown", "Mr. Green", "Mrs. Lee", "Mr. Gray", "Mrs. Rose", "Mr. Stone"])
    task, done = rng.choice(
        [
            ("carry her bags", "carried the bags all the way home"),
            ("find the lost cat", "found the cat sleeping on a roof"),
            ("water the flowers", "watered every flower in the garden"),
            ("pick the apples", "picked a whole basket of apples"),
        ]
    )
    if old.startswith("Mr."):
        task = task.replace("her ", "his ")
    gift = rng.choice(FOODS)
    return [
        f"Next to {h.name}'s house lived an old neighbour named {old}.",
        f"One day, {h.name} saw {old} near {rng.choice(feats)} at the {place}. {old} needed "
        f"help to {task}.",
        f'"I can help you!" said {h.name}. So {h.name} {done}.',
        f'"Thank you, {h.name}," said {old}. "You are very {h.trait}." {old} gave {h.name} '
        f"{_a(gift)} as a thank you.",
        f"{h.name} ate the {gift} and felt warm inside. Helping others is a good thing to do.",
    ]


def _race(rng, h, f, place, feats):
    x = rng.choice(feats)
    return [
        f'One day at the {place}, {f.name} said, "Let us race to {x}!" {h.name} said yes.',
        f'"Ready, set, go!" They ran as fast as they could. {h.name} was in front.',
        f"But then {f.name} fell and hurt {f.his} knee. {f.name} started to cry.",
        f"{h.name} stopped running. {h.He} went back and helped {f.name} get up.",
        f"They walked to {x} together, side by side. Nobody won the race, but they were both "
        f"happy.",
        f"{h.name} knew that a friend is more important than winning.",
    ]


def _birthday(rng, h, f, place, feats):
    gift, color = rng.choice(GIFTS), rng.choice(COLORS)
    n = rng.choice(NUMBERS[2:])
    return [
        f"Tomorrow was {f.name}'s birthday. {f.name} would be {n} years old.",
        f"{h.name} wanted to give {f.name} something special. {h.He} made {gift} with "
        f"{color} paper and lots of glue.",
        f"The next day, {h.name} went to the {place} with the gift. All of {f.name}'s friends "
        f"were there.",
        f'"Happy birthday, {f.name}!" said {h.name}. {f.name} opened the gift and saw {gift}.',
        f'"I love it!" said {f.name}. "It is {color}, my favorite color!" Everyone sang and ate '
        f"cake, and {f.name} had the best {ORDINALS[n]} birthday.",
    ]


def _discover(rng, h, f, place, feats):
    x = rng.choice(feats)
    thing, inside = rng.choice(
        [
            ("a little wooden box", "a tiny golden key"),
            ("a small red door", "a room full of books"),
            ("an old map", "a path to a hidden pond"),
            ("a round blue egg", "a baby bird"),
        ]
    )
    return [
        f"One day, {h.name} was playing at the {place}. Near {x}, {h.he} found {thing}.",
        f"{h.name} was very curious. {h.He} called {f.name} to come and see.",
        f'"What is it?" asked {f.name}. "Let us find out," said {h.name}.',
        f"Slowly, they opened it, and inside they found {inside}! They could not believe it.",
        f"{h.name} and {f.name} ran home to tell everyone about {thing} and {inside}.",
    ]


PLOTS = [_lost, _friend, _share, _fear, _build, _picnic, _help, _race, _birthday, _discover]


def story(rng: random.Random) -> str:
    """One story: an introduction of the hero, then one plot, paragraphs joined by newlines."""
    hero = _Char(rng)
    friend = _Char(rng, avoid=hero.name)
    place = rng.choice(list(PLACES))
    plot = rng.choice(PLOTS)
    body = plot(rng, hero, friend, place, PLACES[place])
    return "\n".join([hero.intro(rng), *body])


def generate_stories(n: int, seed: int) -> Iterator[str]:
    """n stories, the same for the same (n, seed) on every machine (random.Random is portable)."""
    rng = random.Random(seed)
    for _ in range(n):
        yield story(rng)


def ensure_demo_corpus(cache_dir: str | Path) -> Path:
    """{cache_dir}/demo/corpus-{version}/ with train.jsonl and validation.jsonl, built once."""

    def build(tmp: Path) -> None:
        for split, n, seed in (("train", N_TRAIN, TRAIN_SEED), ("validation", N_VALID, VALID_SEED)):
            with open(tmp / f"{split}.jsonl", "w") as fh:
                for text in generate_stories(n, seed):
                    fh.write(json.dumps({"text": text}) + "\n")

    return build_once(Path(cache_dir) / "demo" / f"corpus-{DEMO_VERSION}", build)


def ensure_demo_tokenizer(cache_dir: str | Path) -> Path:
    """{cache_dir}/demo/tokenizer-{version}-{vocab}/: a DEMO_VOCAB_SIZE byte-level BPE trained
    on the demo's train stories, built once."""
    corpus = ensure_demo_corpus(cache_dir)

    def build(tmp: Path) -> None:
        with open(corpus / "train.jsonl") as fh:
            texts = (json.loads(line)["text"] for line in fh)
            train_tokenizer(texts, DEMO_VOCAB_SIZE, tmp)

    name = f"tokenizer-{DEMO_VERSION}-{DEMO_VOCAB_SIZE}"
    return build_once(Path(cache_dir) / "demo" / name, build)
