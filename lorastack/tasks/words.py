"""Small fixed vocabularies shared by the task generators (kept here so tasks stay readable)."""

NOUNS = (
    "apple river stone cloud garden window candle forest bridge mirror pencil rocket island "
    "tiger violin basket harbor lemon engine planet castle meadow pillow ladder button desert "
    "jacket marble needle orange pepper silver tunnel wallet anchor blanket cactus dragon "
    "feather glacier hammer kettle lantern magnet nickel oyster parrot quartz saddle tomato "
    "umbrella velvet walnut yogurt zebra barrel carpet dolphin falcon giraffe helmet insect "
    "jungle koala lizard monkey napkin orchid puzzle rabbit salmon turtle valley whistle "
    "acorn beacon cherry donkey eagle fossil goblet hornet igloo jigsaw kitten lobster"
).split()

ADJECTIVES = (
    "quick lazy bright silent golden frozen hidden gentle brave clever quiet rapid ancient "
    "bitter calm eager fancy giant humble jolly kind lucky merry noble proud rusty shiny "
    "tiny vast wild young zesty"
).split()

FIRST_NAMES = (
    "Alice Bruno Carmen Dmitri Elena Farid Greta Hiro Ingrid Jonas Keiko Liam Maya Nadia "
    "Oscar Priya Quentin Rosa Sanjay Tomas Uma Victor Wendy Xavier Yara Zane"
).split()

CITIES = (
    "Paris Lima Oslo Cairo Tokyo Quito Dakar Hanoi Perth Rome Riga Kyiv Seoul Delhi Accra "
    "Bogota Dublin Lisbon Madrid Nairobi Prague Sofia Tunis Vienna Warsaw Zagreb"
).split()

COLORS = "red blue green yellow purple orange black white brown pink gray teal".split()

MONTHS = (
    "January February March April May June July August September October November December"
).split()
