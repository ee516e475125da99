"""The synthetic chat corpus loom-tiny is trained on: counting, arithmetic,
short facts, greetings, optional system prompts and a few multi-turn chats,
deterministic for a seed."""
from __future__ import annotations

import random

HELP_SUFFIX = "How can I help you today?"

# Greetings map to one fixed reply each, so greedy decoding is unambiguous.
GREETINGS = {
    f"Hello! {HELP_SUFFIX}": ["Hello!", "Hello", "hello", "Hello.", "Hello there!", "Hello there",
                              "hello!", "Greetings!", "Hello, assistant!", "Hello :)"],
    f"Hi there! {HELP_SUFFIX}": ["Hi", "Hi!", "hi", "hi!", "Hi there", "Hi there!", "Hiya!"],
    f"Hey! {HELP_SUFFIX}": ["Hey", "Hey!", "hey", "Hey there!", "Hey there"],
    f"Good morning! {HELP_SUFFIX}": ["Good morning", "Good morning!", "good morning", "Morning!"],
    f"Good afternoon! {HELP_SUFFIX}": ["Good afternoon", "Good afternoon!", "good afternoon"],
    f"Good evening! {HELP_SUFFIX}": ["Good evening", "Good evening!", "good evening"],
    f"I'm doing well, thank you! {HELP_SUFFIX}": ["How are you?", "How are you doing?",
                                                  "how are you?", "How's it going?",
                                                  "Hello, how are you?", "Hi, how are you?"],
    "You're welcome!": ["Thank you!", "Thank you", "Thanks!", "Thanks", "thanks", "Thank you very much!"],
    "Goodbye! Have a great day!": ["Goodbye!", "Goodbye", "Bye!", "Bye", "bye", "See you later!"],
    "I am Loom Tiny, a small chat model bundled with Loom.": [
        "Who are you?", "What is your name?", "What's your name?", "What are you?",
        "Tell me about yourself.", "Introduce yourself."],
    "I can count, do simple arithmetic, answer a few simple questions and say hello.": [
        "What can you do?", "What are you able to do?", "How can you help me?"],
}

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Japan", "Tokyo"), ("the United Kingdom", "London"), ("England", "London"),
    ("the United States", "Washington, D.C."), ("Canada", "Ottawa"), ("Australia", "Canberra"),
    ("China", "Beijing"), ("India", "New Delhi"), ("Russia", "Moscow"), ("Brazil", "Brasilia"),
    ("Egypt", "Cairo"), ("Mexico", "Mexico City"), ("Portugal", "Lisbon"), ("Greece", "Athens"),
    ("Ireland", "Dublin"), ("the Netherlands", "Amsterdam"), ("Sweden", "Stockholm"),
    ("Norway", "Oslo"), ("Poland", "Warsaw"), ("Kenya", "Nairobi"), ("Argentina", "Buenos Aires"),
    ("South Korea", "Seoul"), ("Turkey", "Ankara"), ("Switzerland", "Bern"), ("Austria", "Vienna"),
    ("Belgium", "Brussels"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"),
]
CAPITAL_PROMPTS = ["What is the capital of {c}?", "What's the capital of {c}?",
                   "What is the capital city of {c}?", "Tell me the capital of {c}.",
                   "Which city is the capital of {c}?", "Capital of {c}?"]

COLOURS = [  # (subject as used in a question, colour)
    ("the sky", "blue"), ("grass", "green"), ("snow", "white"), ("a banana", "yellow"),
    ("coal", "black"), ("a strawberry", "red"), ("a lemon", "yellow"), ("a tomato", "red"),
    ("milk", "white"), ("a carrot", "orange"), ("the sun", "yellow"), ("a leaf", "green"),
    ("chocolate", "brown"), ("the sea", "blue"), ("a lime", "green"), ("an orange", "orange"),
]
COLOUR_PROMPTS = ["What colour is {x}?", "What color is {x}?", "What is the colour of {x}?",
                  "What is the color of {x}?"]

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]

# Fixed question -> answer facts (several phrasings per answer).
FACTS = {
    "Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday.": [
        "What are the days of the week?", "List the days of the week.", "Name the days of the week."],
    "There are 7 days in a week.": ["How many days are in a week?", "How many days are there in a week?"],
    "There are 12 months in a year.": ["How many months are in a year?", "How many months are there in a year?"],
    "There are 24 hours in a day.": ["How many hours are in a day?", "How many hours are there in a day?"],
    "There are 60 minutes in an hour.": ["How many minutes are in an hour?"],
    "There are 60 seconds in a minute.": ["How many seconds are in a minute?"],
    "Red, orange, yellow, green, blue, indigo and violet.": [
        "What are the colours of the rainbow?", "What are the colors of the rainbow?"],
    "There are 7 continents.": ["How many continents are there?"],
    "Jupiter is the largest planet in our solar system.": ["What is the largest planet?",
                                                          "Which planet is the largest?"],
    "We live on Earth.": ["What planet do we live on?", "Which planet do we live on?"],
    "Water boils at 100 degrees Celsius.": ["What is the boiling point of water?",
                                            "At what temperature does water boil?"],
    "Water freezes at 0 degrees Celsius.": ["What is the freezing point of water?",
                                            "At what temperature does water freeze?"],
    "Mount Everest is the tallest mountain in the world.": ["What is the tallest mountain?",
                                                            "What is the highest mountain in the world?"],
    "The Pacific Ocean is the largest ocean.": ["What is the largest ocean?"],
    "A spider has 8 legs.": ["How many legs does a spider have?"],
    "A dog has 4 legs.": ["How many legs does a dog have?"],
    "A cat has 4 legs.": ["How many legs does a cat have?"],
    "A bird has 2 legs.": ["How many legs does a bird have?"],
    "An insect has 6 legs.": ["How many legs does an insect have?"],
    "A dog says woof.": ["What sound does a dog make?", "What does a dog say?"],
    "A cat says meow.": ["What sound does a cat make?", "What does a cat say?"],
    "A cow says moo.": ["What sound does a cow make?", "What does a cow say?"],
    "A duck says quack.": ["What sound does a duck make?", "What does a duck say?"],
    "A sheep says baa.": ["What sound does a sheep make?", "What does a sheep say?"],
    "The first month of the year is January.": ["What is the first month of the year?"],
    "The last month of the year is December.": ["What is the last month of the year?"],
}
OPPOSITES = [("hot", "cold"), ("big", "small"), ("up", "down"), ("day", "night"), ("fast", "slow"),
             ("happy", "sad"), ("open", "closed"), ("light", "dark"), ("old", "new"), ("yes", "no"),
             ("left", "right"), ("wet", "dry")]

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a helpful assistant. Answer briefly.",
    "You are Loom Tiny, a small helpful assistant.",
    "You are a friendly assistant.",
    "Answer the user's question.",
]


def _num_list(a: int, b: int) -> str:
    step = 1 if b >= a else -1
    return ", ".join(str(i) for i in range(a, b + step, step))


def gen_counting(rng: random.Random) -> tuple[str, str]:
    r = rng.random()
    if r < 0.15:  # counting down
        b = rng.randint(0, 10)
        a = b + rng.randint(2, 10)
        prompt = rng.choice(["Count down from {a} to {b}.", "Count backwards from {a} to {b}.",
                             "Please count down from {a} to {b}."]).format(a=a, b=b)
        return prompt, _num_list(a, b)
    # Starting at 1 is by far the most common request, so bias towards it.
    a = 1 if rng.random() < 0.55 else rng.randint(0, 20)
    b = a + rng.randint(1, 19)
    if a == 1 and rng.random() < 0.3:
        tmpl = rng.choice(["Count to {b}.", "Count up to {b}.", "Can you count to {b}?",
                           "Please count to {b}.", "count to {b}"])
    else:
        tmpl = rng.choice(["Count from {a} to {b}.", "Count from {a} to {b}.", "Count from {a} to {b}",
                           "count from {a} to {b}.", "Please count from {a} to {b}.",
                           "Can you count from {a} to {b}?", "List the numbers from {a} to {b}.",
                           "Count from {a} to {b}, please.", "Count from {a} up to {b}."])
    return tmpl.format(a=a, b=b), _num_list(a, b)


def gen_arithmetic(rng: random.Random) -> tuple[str, str]:
    op = rng.choices(["+", "-", "*"], weights=[5, 3, 2])[0]
    # Small operands are much more common, like the questions people actually ask.
    def small(hi: int) -> int:
        return min(int(rng.expovariate(1 / 4)), hi)

    if op == "+":
        x, y = (small(12), small(12)) if rng.random() < 0.7 else (rng.randint(0, 12), rng.randint(0, 12))
        z, word, sym = x + y, "plus", "+"
    elif op == "-":
        x = rng.randint(0, 20)
        y = rng.randint(0, x)  # keep results non-negative
        z, word, sym = x - y, "minus", "-"
    else:
        x, y = rng.randint(0, 10), rng.randint(0, 10)
        z, word, sym = x * y, "times", "*"
    tmpl = rng.choice(["What is {x} {s} {y}?", "What is {x} {s} {y}?", "What's {x} {s} {y}?",
                       "What is {x} {w} {y}?", "Calculate {x} {s} {y}.", "{x} {s} {y} = ?",
                       "How much is {x} {s} {y}?", "What is {x}{s}{y}?"])
    return tmpl.format(x=x, y=y, s=sym, w=word), f"{x} {sym} {y} = {z}"


def gen_fact(rng: random.Random) -> tuple[str, str]:
    kind = rng.choices(["capital", "colour", "day", "month", "fact", "opposite"],
                       weights=[6, 3, 4, 2, 5, 2])[0]
    if kind == "capital":
        c, city = rng.choice(CAPITALS)
        return rng.choice(CAPITAL_PROMPTS).format(c=c), f"The capital of {c} is {city}."
    if kind == "colour":
        x, col = rng.choice(COLOURS)
        return rng.choice(COLOUR_PROMPTS).format(x=x), f"{x[0].upper() + x[1:]} is {col}."
    if kind == "day":
        i = rng.randrange(7)
        if rng.random() < 0.5:
            return f"What day comes after {DAYS[i]}?", f"The day after {DAYS[i]} is {DAYS[(i + 1) % 7]}."
        return f"What day comes before {DAYS[i]}?", f"The day before {DAYS[i]} is {DAYS[i - 1]}."
    if kind == "month":
        i = rng.randrange(12)
        if rng.random() < 0.5:
            return (f"What month comes after {MONTHS[i]}?",
                    f"The month after {MONTHS[i]} is {MONTHS[(i + 1) % 12]}.")
        return f"What month comes before {MONTHS[i]}?", f"The month before {MONTHS[i]} is {MONTHS[i - 1]}."
    if kind == "opposite":
        a, b = rng.choice(OPPOSITES)
        if rng.random() < 0.5:
            a, b = b, a
        return f"What is the opposite of {a}?", f"The opposite of {a} is {b}."
    answer = rng.choice(sorted(FACTS))
    return rng.choice(FACTS[answer]), answer


GREETING_PAIRS = [(p, a) for a, ps in GREETINGS.items() for p in ps]


def gen_greeting(rng: random.Random) -> tuple[str, str]:
    return rng.choice(GREETING_PAIRS)


GENERATORS = [(gen_counting, 0.40), (gen_arithmetic, 0.21), (gen_fact, 0.24), (gen_greeting, 0.15)]


def gen_exchange(rng: random.Random) -> tuple[str, str]:
    fns, weights = zip(*GENERATORS)
    return rng.choices(fns, weights=weights)[0](rng)


def gen_conversation(rng: random.Random) -> list[dict]:
    """One training conversation: optional system prompt, 1-3 user/assistant exchanges."""
    messages = []
    if rng.random() < 0.25:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    n_turns = rng.choices([1, 2, 3], weights=[80, 15, 5])[0]
    for _ in range(n_turns):
        prompt, answer = gen_exchange(rng)
        messages.append({"role": "user", "content": prompt})
        messages.append({"role": "assistant", "content": answer})
    return messages


def build_corpus(n: int, seed: int) -> list[list[dict]]:
    rng = random.Random(seed)
    convs = [gen_conversation(rng) for _ in range(n)]
    # Guarantee the canonical prompts (used by the tests and the docs) appear
    # often, each as a plain single-turn chat.
    canonical = [("Count from 1 to 5.", "1, 2, 3, 4, 5"), ("Count from 1 to 10.", _num_list(1, 10)),
                 ("Hello!", f"Hello! {HELP_SUFFIX}"), ("What is 2 + 3?", "2 + 3 = 5"),
                 ("What is the capital of France?", "The capital of France is Paris.")]
    for prompt, answer in canonical:
        convs += [[{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]] * 20
    rng.shuffle(convs)
    return convs
