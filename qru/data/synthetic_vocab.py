"""The closed vocabularies and sentence templates of the synthetic fictitious-people corpus
(:mod:`qru.data.synthetic`): name syllables, the fact values (mutually disjoint across fact types; a
value is a KnowMem answer), prose, question, intro and generic-sentence templates."""
from __future__ import annotations

FIRST_A = ("Va", "Ko", "Mi", "Tor", "Ele", "Sa", "Bri", "Ju", "Ka", "Lo", "Ne", "Ro", "Ta", "Zi", "Fe",
            "Da", "Ori", "Ye", "Ilo", "Qui")
FIRST_B = ("len", "ra", "dan", "mir", "sa", "vin", "ta", "lia", "rik", "no", "bel", "thea", "wen", "dor")
LAST_A = ("Kor", "Vel", "Mar", "Tal", "Bran", "Dru", "Hest", "Lom", "Quen", "Ros", "Sel", "Yar", "Zim",
           "Fen", "Gar", "Ost", "Pell", "Thar")
LAST_B = ("i", "a", "o", "e", "u", "")
LAST_C = ("dash", "wyn", "bek", "ton", "mere", "vik", "lund", "sore", "dell", "nak", "rath", "quist", "zen",
           "holm")

VOCAB: dict[str, tuple[str, ...]] = {
    "birthplace": (
        "Marrowby", "Eastholt", "Quillmere", "Brantwick", "Sollenford", "Dunmarrow", "Ostvale", "Kestrel Bay",
        "Fernhollow", "Ashcombe Vale", "Tarnwick", "Lowmere", "Corrisford", "Mirefield", "Pellan Cross",
        "Wexhaven", "Thornmouth", "Gallowmere", "Brisk Harbour", "Elmstead Reach", "Varrow", "Hollin Ford",
        "Cadmere", "Skellwick", "Ravensholt", "Orlen Bay", "Fallowdene", "Quarry End", "Dovecombe", "Lintmoor"),
    "birth_year": tuple(str(y) for y in range(1940, 2000)),
    "profession": (
        "baker", "marine biologist", "carpenter", "architect", "violin teacher", "pharmacist", "ferry captain",
        "librarian", "beekeeper", "glassblower", "surveyor", "translator", "watchmaker", "botanist", "dentist",
        "locksmith", "cartographer", "nurse", "geologist", "tailor", "potter", "journalist", "veterinarian",
        "firefighter", "accountant", "chemist", "sculptor", "pilot", "stonemason", "florist"),
    "employer": (
        "Halden Works", "Corvex Labs", "Pellridge Foods", "Bramwell Logistics", "Orrin Textiles",
        "Sunvale Energy", "Kestwick Press", "Marlow Optics", "Tamsin Motors", "Greyloch Bank", "Ivel Shipping",
        "Norcastle Mills", "Quorra Pharma", "Brightwater Hotels", "Dunholt Mining", "Evenfield Farms",
        "Carrow Insurance", "Lattice Robotics", "Wendmoor Glass", "Ashgrove Furniture", "Pinecrest Airlines",
        "Solent Ceramics", "Harrowby Clinic", "Veldt Software", "Oakhurst School", "Rivermark Studios",
        "Tollgate Hardware", "Mistral Foods", "Copperline Rail", "Fairholm Museum"),
    "colour": (
        "teal", "crimson", "amber", "ochre", "lilac", "navy blue", "olive green", "coral", "ivory", "indigo",
        "scarlet", "mint green", "charcoal grey", "lavender", "saffron", "turquoise", "maroon", "silver",
        "emerald", "peach"),
    "food": (
        "lentil soup", "plum cake", "fried rice", "mushroom risotto", "apple pie", "fish stew", "potato curry",
        "lemon tart", "roast chicken", "spinach pie", "rye bread", "pumpkin soup", "honey biscuits",
        "tomato pasta", "bean chili", "grilled trout", "cherry pancakes", "barley stew", "onion tart",
        "rice pudding", "carrot cake", "pea soup", "pear crumble", "cheese toast"),
    "pet": (
        "Pip", "Biscuit", "Juniper", "Moss", "Pepper", "Clover", "Ziggy", "Marble", "Tofu", "Rascal",
        "Nutmeg", "Pickle", "Domino", "Sprout", "Cosmo", "Tinker", "Maple", "Waffle", "Button", "Pebble",
        "Sable", "Gizmo", "Dumpling", "Fig"),
    "hobby": (
        "chess", "birdwatching", "rock climbing", "knitting", "gardening", "sailing", "pottery", "fishing",
        "archery", "origami", "stargazing", "cycling", "woodcarving", "kite flying", "painting", "calligraphy",
        "fencing", "rowing", "juggling", "tennis", "yoga", "swimming", "photography", "embroidery"),
}
FACT_TYPES: tuple[str, ...] = tuple(VOCAB)

# Prose templates. {S}/{s}: subject (name or pronoun, capitalised / not), {P}/{p}: possessive,
# {N}: always the full name, {pp}: always the possessive pronoun, {a}: "a"/"an" for the value, {v}: value.
PROSE: dict[str, tuple[str, ...]] = {
    "birthplace": ("{S} was born in {v}.", "{P} hometown is {v}.", "{S} comes from {v}.",
                   "The town of {v} is where {N} was born."),
    "birth_year": ("{S} was born in {v}.", "{P} year of birth is {v}.", "{S} was born in the year {v}.",
                   "In {v}, {N} was born."),
    "profession": ("{S} works as {a} {v}.", "By profession, {N} is {a} {v}.", "{S} earns a living as {a} {v}.",
                   "{S} is {a} {v} by trade."),
    "employer": ("{S} works for {v}.", "{P} employer is {v}.", "{S} has a job at {v}.", "{v} employs {N}."),
    "colour": ("{P} favourite colour is {v}.", "{S} likes the colour {v} best.",
               "Of all colours, {N} loves {v} the most.", "{S} always picks {v} when choosing a colour."),
    "food": ("{P} favourite food is {v}.", "{S} loves to eat {v}.", "Nothing makes {N} happier than {v}.",
             "When asked about food, {N} always names {v}."),
    "pet": ("{S} has a pet called {v}.", "{P} pet is named {v}.", "{v} is the name of {N}'s pet.",
            "At home, {N} looks after a pet named {v}."),
    "hobby": ("{P} hobby is {v}.", "{S} spends weekends on {v}.", "{S} enjoys {v} in {pp} free time.",
              "For fun, {N} likes {v}."),
}
QUESTIONS: dict[str, tuple[str, ...]] = {
    "birthplace": ("Where was {N} born?", "What is the hometown of {N}?", "In which town was {N} born?"),
    "birth_year": ("In what year was {N} born?", "What is the year of birth of {N}?", "When was {N} born?"),
    "profession": ("What does {N} do for a living?", "What is the profession of {N}?",
                   "What job does {N} have?"),
    "employer": ("Which company does {N} work for?", "Who is the employer of {N}?", "Where does {N} work?"),
    "colour": ("What is the favourite colour of {N}?", "Which colour does {N} like best?",
               "What colour does {N} love most?"),
    "food": ("What is the favourite food of {N}?", "Which dish does {N} like best?",
             "What does {N} love to eat?"),
    "pet": ("What is the name of {N}'s pet?", "What is the pet of {N} called?", "What is {N}'s pet named?"),
    "hobby": ("What is the hobby of {N}?", "What does {N} do for fun?", "Which pastime does {N} enjoy?"),
}
INTROS = ("This is a short profile of {N}.", "Here are some facts about {N}.", "The following describes {N}.",
          "Many people have heard of {N}.", "{N} is known to many people.", "This note is about {N}.")
GENERIC = {
    "birthplace": ("{v} is a quiet town near the sea.", "{v} is known for its old stone bridge.",
                   "Many families live in {v}.", "The market in {v} opens every morning."),
    "birth_year": ("The winter of {v} was long and cold.", "Many people were born in {v}.",
                   "A new railway opened in {v}."),
    "profession": ("{A} {v} needs years of training.", "Every town needs a good {v}.",
                   "Being {a} {v} is hard work."),
    "employer": ("{v} is a company with many workers.", "{v} opened a new office last year.",
                 "Some people work for {v}."),
    "colour": ("Some people say that {v} is a calm colour.", "The door was painted {v}.",
               "{V} is a popular colour for coats."),
    "food": ("{V} is a popular dish.", "The cafe serves {v} on Sundays.", "Many children like {v}."),
    "pet": ("{v} is a common name for a pet.", "The neighbours have a dog called {v}."),
    "hobby": ("{V} is a pleasant way to spend a weekend.", "The club meets every week for {v}.",
              "Many people enjoy {v}."),
}
PRONOUNS = {"f": ("she", "her"), "m": ("he", "his")}


def article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


def cap(s: str) -> str:
    return s[:1].upper() + s[1:]
