"""Write the labelled example sets beside this script: text.jsonl and image_text.jsonl.

    .venv/bin/python examples/labels/make_labels.py

Every query, passage and caption below was written by hand for this project (short factual statements on
common-knowledge topics: capitals, rivers, inventions, animals, science, books and art); the images are drawn
here with Pillow. No third-party text or image is used, and the output is released as CC0 / public domain.

Each row is {"query", "document", "label", "group"}: label 1 where the document answers the query, 0 where it
does not, and group the query's id, so that a train/held-out split can keep one query's pairs together. Most
negatives are hard: the same topic without the answer (a country's largest city instead of its capital, a
neighbour's capital, the same animal's other traits), plus one or two easy negatives from another topic.

Deterministic: the same rows, in the same order, on every run (a seeded random.Random; Pillow's PNG encoder).
"""

from __future__ import annotations

import base64
import io
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
SEED = 20240611
MAX_TEXT = 300

# ---------------------------------------------------------------------------------------------------------------
# Countries: a capital question and a river question each, the other facts as hard negatives.
# (country, capital facts (1-2), largest-city fact, neighbour-capital fact, river question, river fact)

COUNTRIES = [
    (
        "Australia",
        [
            "Canberra is the capital of Australia, chosen as a compromise between rivals Sydney and Melbourne.",
            "Australia's federal parliament sits in Canberra, in the Australian Capital Territory.",
        ],
        "Sydney is the largest city in Australia and home to the Sydney Opera House.",
        "Wellington is the capital of New Zealand, at the southern tip of the North Island.",
        "What is the longest river in Australia?",
        "The Murray is Australia's longest river, flowing from the Australian Alps to the sea in South Australia.",
    ),
    (
        "Canada",
        [
            "Ottawa, on the Ottawa River in Ontario, is the capital city of Canada.",
            "Canada's Parliament Hill stands in Ottawa, the national capital.",
        ],
        "Toronto is Canada's most populous city and its main financial centre.",
        "Washington, D.C. is the capital of the United States, Canada's southern neighbour.",
        "What is the longest river in Canada?",
        "The Mackenzie, Canada's longest river, flows north from Great Slave Lake to the Beaufort Sea.",
    ),
    (
        "Brazil",
        [
            "Brasília has been the capital of Brazil since 1960, when it replaced Rio de Janeiro.",
        ],
        "São Paulo is the largest city in Brazil and in the whole Southern Hemisphere.",
        "Buenos Aires, on the Río de la Plata, is the capital of Argentina.",
        "Which great river crosses northern Brazil to the Atlantic?",
        "The Amazon crosses northern Brazil to the Atlantic and carries more water than any other river.",
    ),
    (
        "Turkey",
        [
            "Ankara became the capital of Turkey in 1923, replacing Istanbul.",
            "The Turkish parliament, the Grand National Assembly, meets in the capital, Ankara.",
        ],
        "Istanbul, which straddles the Bosphorus, is Turkey's largest city.",
        "Athens is the capital of Greece and one of the oldest cities in Europe.",
        "What is the longest river that lies entirely within Turkey?",
        "The Kızılırmak, or Red River, is the longest river that runs entirely within Turkey.",
    ),
    (
        "Switzerland",
        [
            "Bern is the federal city of Switzerland, where the Swiss government and parliament sit.",
        ],
        "Zurich is the largest city in Switzerland and a major banking centre.",
        "Vienna, on the Danube, is the capital of Austria.",
        "Which major river rises in the Swiss Alps and flows to the North Sea?",
        "The Rhine rises in the Swiss Alps and flows through Germany and the Netherlands to the North Sea.",
    ),
    (
        "Nigeria",
        [
            "Abuja replaced Lagos as the capital of Nigeria in 1991.",
            "Nigeria's capital, Abuja, was built as a planned city in the centre of the country.",
        ],
        "Lagos is Nigeria's largest city and a busy Atlantic port.",
        "Porto-Novo is the official capital of Benin, Nigeria's western neighbour.",
        "Which river gives Nigeria its name?",
        "Nigeria takes its name from the Niger River, which flows through the country to the Gulf of Guinea.",
    ),
    (
        "Morocco",
        [
            "Rabat, on the Atlantic coast, is the capital of Morocco.",
        ],
        "Casablanca is Morocco's largest city and chief port.",
        "Algiers is the capital of Algeria, Morocco's eastern neighbour.",
        "Which mountain range runs across Morocco?",
        "The Atlas Mountains run across Morocco, separating the Atlantic coast from the Sahara.",
    ),
    (
        "Vietnam",
        [
            "Hanoi, on the Red River, is the capital of Vietnam.",
            "Vietnam's capital is Hanoi, in the north of the country.",
        ],
        "Ho Chi Minh City, formerly Saigon, is the largest city in Vietnam.",
        "Vientiane, on the Mekong, is the capital of Laos.",
        "Which river forms a huge delta in southern Vietnam?",
        "The Mekong ends in a vast delta in southern Vietnam before reaching the South China Sea.",
    ),
    (
        "Pakistan",
        [
            "Islamabad, a planned city built in the 1960s, is the capital of Pakistan.",
        ],
        "Karachi, on the Arabian Sea, is Pakistan's largest city.",
        "Kabul is the capital of Afghanistan, Pakistan's western neighbour.",
        "What is the main river of Pakistan?",
        "The Indus is Pakistan's principal river, flowing from the Himalayas to the Arabian Sea.",
    ),
    (
        "India",
        [
            "New Delhi is the capital of India and the seat of its government.",
            "India's parliament and president are based in New Delhi, the national capital.",
        ],
        "Mumbai is India's most populous city and its financial capital.",
        "Kathmandu is the capital of Nepal, India's Himalayan neighbour.",
        "Which river is sacred to Hindus and flows into the Bay of Bengal?",
        "The Ganges, sacred in Hinduism, flows across northern India into the Bay of Bengal.",
    ),
    (
        "Egypt",
        [
            "Cairo is the capital of Egypt and the largest city in the Arab world.",
        ],
        "Alexandria, founded by Alexander the Great, is Egypt's second-largest city.",
        "Tripoli is the capital of Libya, Egypt's western neighbour.",
        "Which river flows through Egypt?",
        "The Nile flows north through Egypt to the Mediterranean, and most Egyptians live along its banks.",
    ),
    (
        "Germany",
        [
            "Berlin is the capital and largest city of Germany.",
            "Since reunification the German government has sat in Berlin, the country's capital.",
        ],
        "Hamburg, a major port on the Elbe, is Germany's second-largest city.",
        "Warsaw is the capital of Poland, Germany's eastern neighbour.",
        "Which river flows through Berlin?",
        "The Spree flows through the centre of Berlin before joining the Havel.",
    ),
    (
        "Japan",
        [
            "Tokyo is the capital of Japan and the seat of its government.",
        ],
        "Osaka is a major commercial city in the Kansai region of Japan.",
        "Seoul is the capital of South Korea, across the sea from Japan.",
        "What is the tallest mountain in Japan?",
        "Mount Fuji, a volcano 3,776 metres high, is the tallest mountain in Japan.",
    ),
    (
        "Kenya",
        [
            "Nairobi is the capital of Kenya and its largest city.",
        ],
        "Mombasa is Kenya's main port on the Indian Ocean coast.",
        "Dodoma is the official capital of Tanzania, Kenya's southern neighbour.",
        "Which lake does Kenya share with Uganda and Tanzania?",
        "Lake Victoria, Africa's largest lake, is shared by Kenya, Uganda and Tanzania.",
    ),
    (
        "Peru",
        [
            "Lima, on the Pacific coast, is the capital of Peru.",
            "Peru's capital and largest city is Lima, founded by the Spanish in 1535.",
        ],
        "Cusco, high in the Andes, was the capital of the Inca Empire.",
        "Quito is the capital of Ecuador, Peru's northern neighbour.",
        "Which lake lies on the border of Peru and Bolivia?",
        "Lake Titicaca, high in the Andes, lies on the border between Peru and Bolivia.",
    ),
    (
        "Norway",
        [
            "Oslo, at the head of the Oslofjord, is the capital of Norway.",
        ],
        "Bergen, on Norway's west coast, is known for its rainy weather and old wharf.",
        "Stockholm is the capital of Sweden, Norway's eastern neighbour.",
        "What are the long narrow sea inlets on Norway's coast called?",
        "Norway's coast is cut by fjords, long narrow sea inlets carved by glaciers.",
    ),
    (
        "New Zealand",
        [
            "Wellington is the capital of New Zealand, at the southern tip of the North Island.",
        ],
        "Auckland is the largest city in New Zealand.",
        "Canberra is the capital of Australia, chosen as a compromise between rivals Sydney and Melbourne.",
        "What is the longest river in New Zealand?",
        "The Waikato, on the North Island, is New Zealand's longest river.",
    ),
    (
        "Spain",
        [
            "Madrid, in the centre of the Iberian Peninsula, is the capital of Spain.",
            "Spain's capital is Madrid, home of the Prado museum and the royal palace.",
        ],
        "Barcelona, on the Mediterranean, is Spain's second-largest city.",
        "Lisbon is the capital of Portugal, Spain's western neighbour.",
        "What is the longest river of the Iberian Peninsula?",
        "The Tagus is the longest river of the Iberian Peninsula, reaching the Atlantic at Lisbon.",
    ),
    (
        "Italy",
        [
            "Rome is the capital of Italy.",
            "Italy's parliament meets in Rome, the capital, which is also home to the Colosseum.",
        ],
        "Milan is Italy's financial centre and a capital of fashion.",
        "Paris is the capital of France, Italy's north-western neighbour.",
        "What is the longest river in Italy?",
        "The Po is Italy's longest river, flowing east across the north of the country to the Adriatic.",
    ),
    (
        "Argentina",
        [
            "Buenos Aires, on the Río de la Plata, is the capital of Argentina.",
        ],
        "Córdoba, in the centre of the country, is Argentina's second-largest city.",
        "Santiago is the capital of Chile, Argentina's western neighbour.",
        "Which waterfalls lie on the border between Argentina and Brazil?",
        "The Iguazu Falls lie on the Iguazu River, on the border between Argentina and Brazil.",
    ),
]

# ---------------------------------------------------------------------------------------------------------------
# Other topics: (category, query, answers, hard negatives)

TOPICS = [
    # inventions and discoveries
    (
        "invention",
        "Who invented the telephone?",
        ["Alexander Graham Bell received the first US patent for the telephone in 1876."],
        [
            "Samuel Morse's telegraph sent coded pulses along wires from the 1840s.",
            "Early telephone exchanges connected calls by hand, with operators plugging cords into a switchboard.",
            "Thomas Edison built the first phonograph, which recorded sound on tin foil, in 1877.",
        ],
    ),
    (
        "invention",
        "Who invented the practical incandescent light bulb?",
        [
            "Thomas Edison demonstrated a long-lasting incandescent lamp with a carbon filament in 1879.",
            "In England, Joseph Swan developed a working incandescent light bulb around the same time as Edison.",
        ],
        [
            "LED lamps use far less electricity than incandescent bulbs for the same light.",
            "Nikola Tesla championed alternating current for electric power distribution.",
        ],
    ),
    (
        "invention",
        "Who invented the World Wide Web?",
        ["Tim Berners-Lee proposed the World Wide Web in 1989 while working at CERN."],
        [
            "The internet grew out of ARPANET, a US research network of the late 1960s.",
            "The first website, hosted at CERN, explained what the web was and how to use it.",
            "Email predates the web by nearly two decades.",
        ],
    ),
    (
        "invention",
        "Who invented the printing press with movable type in Europe?",
        ["Johannes Gutenberg developed a movable-type printing press in Mainz around 1440."],
        [
            "The Gutenberg Bible is one of the earliest major books printed in Europe.",
            "Paper was invented in China and reached Europe through the Islamic world.",
            "William Caxton set up the first printing press in England in 1476.",
        ],
    ),
    (
        "invention",
        "Who discovered penicillin?",
        ["Alexander Fleming discovered penicillin in 1928 when mould killed bacteria in a culture dish."],
        [
            "Louis Pasteur showed that microbes cause fermentation and disease.",
            "Penicillin was mass-produced during the Second World War to treat wounded soldiers.",
            "Antibiotics do not work against viruses such as the common cold.",
        ],
    ),
    (
        "invention",
        "Who invented dynamite?",
        ["Alfred Nobel invented dynamite in 1867 by stabilising nitroglycerin."],
        [
            "The Nobel Prizes were first awarded in 1901.",
            "Gunpowder was invented in China many centuries ago.",
            "Nitroglycerin is a powerful liquid explosive that is dangerously sensitive to shock.",
        ],
    ),
    (
        "invention",
        "Who made the first powered airplane flight?",
        [
            "Orville and Wilbur Wright made the first controlled, powered airplane flight in December 1903.",
            "At Kitty Hawk in 1903 the Wright brothers' Flyer made the first sustained powered flight.",
        ],
        [
            "The Montgolfier brothers flew the first crewed hot-air balloon in 1783.",
            "Charles Lindbergh flew solo and non-stop across the Atlantic in 1927.",
        ],
    ),
    (
        "invention",
        "Who created the periodic table?",
        ["Dmitri Mendeleev published a periodic table of the elements in 1869, leaving gaps for unknown ones."],
        [
            "Marie Curie discovered the elements polonium and radium.",
            "The periodic table now lists 118 known elements.",
            "John Dalton proposed that each element is made of its own kind of atom.",
        ],
    ),
    (
        "invention",
        "Who developed the first smallpox vaccine?",
        ["Edward Jenner tested the first smallpox vaccine, made from cowpox, in 1796."],
        [
            "Smallpox was declared eradicated by the World Health Organization in 1980.",
            "Jonas Salk developed an injected polio vaccine in the 1950s.",
            "Vaccines train the immune system to recognise a germ before an infection.",
        ],
    ),
    (
        "invention",
        "Who invented the ballpoint pen?",
        ["László Bíró, a Hungarian journalist, patented the modern ballpoint pen in 1938."],
        [
            "Fountain pens draw ink from a reservoir through a nib by capillary action.",
            "Quill pens cut from bird feathers were used for writing for centuries.",
        ],
    ),
    (
        "invention",
        "Who invented the telescope?",
        ["Hans Lippershey, a Dutch spectacle maker, applied for a patent on a telescope in 1608."],
        [
            "In 1610 Galileo reported four moons orbiting Jupiter, seen through a telescope he built himself.",
            "The Hubble Space Telescope was launched into orbit in 1990.",
            "Isaac Newton built a reflecting telescope that used a curved mirror instead of lenses.",
        ],
    ),
    (
        "invention",
        "Who invented the cotton gin?",
        ["Eli Whitney patented the cotton gin, which separates cotton fibres from seeds, in 1794."],
        [
            "Cotton is a soft fibre that grows around the seeds of the cotton plant.",
            "The spinning jenny, invented by James Hargreaves, spun several threads at once.",
        ],
    ),
    (
        "invention",
        "Who invented the jet engine?",
        [
            "Frank Whittle patented a turbojet engine in England in 1930.",
            "Hans von Ohain designed a jet engine in Germany independently of Frank Whittle.",
        ],
        [
            "The de Havilland Comet was the first commercial jet airliner.",
            "Propeller aircraft use a piston engine or a turbine to turn their blades.",
        ],
    ),
    # animals
    (
        "animal",
        "What is the fastest land animal?",
        ["The cheetah is the fastest land animal, sprinting at around 100 km/h over short distances."],
        [
            "The peregrine falcon is the fastest bird, diving at over 300 km/h.",
            "Cheetahs hunt mostly during the day, chasing gazelles and impalas on the savanna.",
            "The pronghorn of North America can keep up high speeds over long distances.",
        ],
    ),
    (
        "animal",
        "What is the largest animal that has ever lived?",
        ["The blue whale is the largest animal known to have ever lived, larger than any dinosaur."],
        [
            "The African elephant is the largest living land animal.",
            "Blue whales feed almost entirely on tiny crustaceans called krill.",
            "The whale shark is the largest living fish.",
        ],
    ),
    (
        "animal",
        "How many hearts does an octopus have?",
        ["An octopus has three hearts: two pump blood through the gills and one through the rest of the body."],
        [
            "An octopus's blood is blue because it carries oxygen with copper-based hemocyanin.",
            "An octopus has eight arms lined with suckers that can taste what they touch.",
            "The human heart has four chambers.",
        ],
    ),
    (
        "animal",
        "Which bird lays the largest eggs?",
        ["The ostrich lays the largest eggs of any living bird, each weighing more than a kilogram."],
        [
            "The bee hummingbird, the smallest bird, lays eggs about the size of a coffee bean.",
            "Ostriches cannot fly, but they can run at about 70 km/h.",
            "The emu of Australia is the second-tallest living bird.",
        ],
    ),
    (
        "animal",
        "How do bats find insects in the dark?",
        [
            "Many bats hunt by echolocation, calling at high pitch and listening for echoes off insects.",
            "Insect-eating bats locate prey at night from the echoes of their own ultrasonic calls.",
        ],
        [
            "Bats are the only mammals capable of sustained flight.",
            "Fruit bats rely largely on sight and smell to find ripe fruit.",
        ],
    ),
    (
        "animal",
        "What do giant pandas eat?",
        [
            "Bamboo makes up about 99 percent of a giant panda's diet.",
            "Giant pandas spend up to 14 hours a day eating bamboo shoots, stems and leaves.",
        ],
        [
            "Giant pandas live in mountain forests in central China.",
            "The red panda is a small tree-dwelling mammal of the Himalayas with a ringed tail.",
        ],
    ),
    (
        "animal",
        "How long is an elephant pregnant?",
        ["An African elephant's pregnancy lasts about 22 months, the longest of any land mammal."],
        [
            "A newborn elephant calf weighs roughly 100 kilograms.",
            "Elephant herds are led by an older female, the matriarch.",
            "A blue whale is pregnant for about a year.",
        ],
    ),
    (
        "animal",
        "What is stored in a camel's hump?",
        ["A camel's hump stores fat, not water, which the animal can live on when food is scarce."],
        [
            "Dromedary camels have one hump and Bactrian camels have two.",
            "Camels can drink a very large amount of water at once after a long trek.",
            "Llamas and alpacas are South American relatives of the camel.",
        ],
    ),
    (
        "animal",
        "How long does a worker honeybee live?",
        ["A worker honeybee born in summer usually lives only about five to six weeks."],
        [
            "A honeybee queen can live for several years.",
            "Honeybees tell their hive-mates where flowers are with a waggle dance.",
            "Bumblebees are larger and hairier than honeybees.",
        ],
    ),
    # science
    (
        "science",
        "At what temperature does water boil at sea level?",
        ["At standard atmospheric pressure, pure water boils at 100 degrees Celsius (212 °F)."],
        [
            "Water freezes at 0 degrees Celsius at standard pressure.",
            "High in the mountains water boils at a lower temperature, so cooking takes longer.",
            "Ethanol boils at about 78 degrees Celsius.",
        ],
    ),
    (
        "science",
        "What is the chemical symbol for gold?",
        ["Gold has the chemical symbol Au, from the Latin word aurum."],
        [
            "Silver's chemical symbol is Ag, from the Latin argentum.",
            "Gold is so malleable that it can be beaten into sheets thinner than a hair.",
            "Lead has the symbol Pb, from the Latin plumbum.",
        ],
    ),
    (
        "science",
        "How far is the Moon from Earth?",
        ["The Moon orbits at an average distance of about 384,400 kilometres from Earth."],
        [
            "The Sun is about 150 million kilometres from Earth.",
            "The Moon is about 3,474 kilometres across.",
            "Apollo 11 landed the first astronauts on the Moon in July 1969.",
        ],
    ),
    (
        "science",
        "What is the speed of light?",
        ["Light travels through a vacuum at 299,792,458 metres per second."],
        [
            "Sound travels through air at about 343 metres per second at 20 °C.",
            "Sunlight takes about eight minutes to reach Earth.",
        ],
    ),
    (
        "science",
        "Which gas do plants take in for photosynthesis?",
        ["In photosynthesis plants take in carbon dioxide and water and use light to make sugars."],
        [
            "Plants release oxygen as a by-product of photosynthesis.",
            "Chlorophyll is the green pigment that absorbs light in leaves.",
            "Nitrogen makes up about 78 percent of the air.",
        ],
    ),
    (
        "science",
        "What is the largest planet in the Solar System?",
        ["Jupiter is the largest planet in the Solar System, more than eleven times as wide as Earth."],
        [
            "Saturn is best known for its bright system of rings.",
            "Jupiter's Great Red Spot is a storm that has been observed for centuries.",
            "Mercury is the smallest planet in the Solar System.",
        ],
    ),
    (
        "science",
        "How many bones are in the adult human body?",
        ["An adult human skeleton has 206 bones."],
        [
            "A newborn baby has around 270 bones, some of which fuse as it grows.",
            "The femur, in the thigh, is the longest bone in the human body.",
            "The stapes in the middle ear is the smallest bone in the body.",
        ],
    ),
    # books, art, music
    (
        "arts",
        "Who wrote Pride and Prejudice?",
        ["Jane Austen's novel Pride and Prejudice was published in 1813."],
        [
            "Charlotte Brontë's Jane Eyre was published in 1847.",
            "Pride and Prejudice follows Elizabeth Bennet and the proud Mr Darcy.",
            "Emma is a novel about a young woman who meddles in her friends' love lives.",
        ],
    ),
    (
        "arts",
        "Who wrote One Hundred Years of Solitude?",
        ["Gabriel García Márquez published One Hundred Years of Solitude in 1967."],
        [
            "Isabel Allende's The House of the Spirits appeared in 1982.",
            "One Hundred Years of Solitude tells the story of the Buendía family in the town of Macondo.",
        ],
    ),
    (
        "arts",
        "Who wrote War and Peace?",
        ["Leo Tolstoy wrote War and Peace, published in full in 1869."],
        [
            "Fyodor Dostoevsky's Crime and Punishment was published in 1866.",
            "War and Peace is set during Napoleon's invasion of Russia.",
        ],
    ),
    (
        "arts",
        "Who painted the Mona Lisa?",
        [
            "Leonardo da Vinci painted the Mona Lisa in the early 1500s.",
            "The Mona Lisa, Leonardo da Vinci's portrait of Lisa Gherardini, is his most famous painting.",
        ],
        [
            "The Mona Lisa hangs in the Louvre in Paris behind protective glass.",
            "Michelangelo painted the ceiling of the Sistine Chapel between 1508 and 1512.",
        ],
    ),
    (
        "arts",
        "Who composed The Four Seasons?",
        ["Antonio Vivaldi composed The Four Seasons, a set of four violin concertos, in the 1720s."],
        [
            "Johann Sebastian Bach wrote the six Brandenburg Concertos.",
            "Each concerto of The Four Seasons depicts one season of the year.",
        ],
    ),
    (
        "arts",
        "Who wrote Things Fall Apart?",
        ["Chinua Achebe's first novel, Things Fall Apart, was published in 1958."],
        [
            "Wole Soyinka became the first African winner of the Nobel Prize in Literature in 1986.",
            "Things Fall Apart follows Okonkwo, a respected man in an Igbo village.",
        ],
    ),
    (
        "arts",
        "Who is said to have composed the Odyssey?",
        ["The Odyssey is traditionally credited to Homer, the Greek poet also said to have composed the Iliad."],
        [
            "Virgil's Aeneid tells of Aeneas's journey from Troy to Italy.",
            "In the Odyssey, Odysseus spends ten years trying to return home to Ithaca.",
        ],
    ),
    # geography
    (
        "geography",
        "What is the highest mountain above sea level?",
        ["Mount Everest, in the Himalayas, is the highest mountain above sea level at about 8,849 metres."],
        [
            "K2, on the border of Pakistan and China, is the second-highest mountain in the world.",
            "Edmund Hillary and Tenzing Norgay first reached the summit of Everest in 1953.",
        ],
    ),
    (
        "geography",
        "What is the largest ocean?",
        ["The Pacific is the largest ocean, covering about a third of Earth's surface."],
        [
            "The Atlantic is the second-largest ocean.",
            "The Mariana Trench in the western Pacific is the deepest known point in the ocean.",
        ],
    ),
    (
        "geography",
        "What is the smallest country in the world?",
        ["Vatican City, an enclave within Rome, is the smallest country in the world."],
        [
            "Monaco is the second-smallest country in the world.",
            "Vatican City is home to St Peter's Basilica and the Sistine Chapel.",
        ],
    ),
]


def text_rows(rng: random.Random) -> list[dict]:
    """(query id, query, document, label, category) in a stable order."""
    items: list[tuple[str, str, list[str], list[str]]] = []  # (category, query, positives, hard negatives)
    for i, (country, capitals, big_city, neighbour, river_q, river) in enumerate(COUNTRIES):
        other_river = COUNTRIES[(i + 1) % len(COUNTRIES)][5]
        items.append(("capital", f"What is the capital of {country}?", capitals, [big_city, neighbour, river]))
        items.append(("country", river_q, [river], [capitals[0], big_city, other_river]))
    for category, query, answers, hard in TOPICS:
        items.append((category, query, answers, hard))

    rows = []
    for n, (category, query, positives, hard) in enumerate(items):
        group = f"t{n:03d}"
        # One easy negative: the first answer of an item of another category.
        others = [it[2][0] for it in items if it[0] != category and it[1] != query]
        easy = rng.sample(others, 1)
        docs = [(d, 1) for d in positives] + [(d, 0) for d in hard + easy]
        rng.shuffle(docs)
        rows.extend({"query": query, "document": d, "label": label, "group": group} for d, label in docs)
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Images: a coloured shape on a light background, captions "a <colour> <shape>".

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (130, 40, 170),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
SIZE = 64


def draw(colour: str, shape: str, rng: random.Random) -> str:
    """A 64x64 PNG, base64: the shape at a random size and place, a random pale background."""
    bg = tuple(rng.randint(235, 255) for _ in range(3))
    img = Image.new("RGB", (SIZE, SIZE), bg)
    d = ImageDraw.Draw(img)
    r = rng.randint(14, 24)
    cx, cy = rng.randint(r + 2, SIZE - r - 3), rng.randint(r + 2, SIZE - r - 3)
    fill = COLOURS[colour]
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def image_rows(rng: random.Random) -> list[dict]:
    """Per caption: 3 matching images, 2 of the same colour and another shape, 3 of the same shape and another
    colour, 3 of neither."""
    rows = []
    for n, (colour, shape) in enumerate((c, s) for c in COLOURS for s in SHAPES):
        other_shapes = [s for s in SHAPES if s != shape]
        other_colours = [c for c in COLOURS if c != colour]
        pairs = [(colour, shape, 1)] * 3
        pairs += [(colour, s, 0) for s in other_shapes]
        pairs += [(c, shape, 0) for c in rng.sample(other_colours, 3)]
        pairs += [(rng.choice(other_colours), rng.choice(other_shapes), 0) for _ in range(3)]
        rng.shuffle(pairs)
        group = f"i{n:03d}"
        for c, s, label in pairs:
            rows.append(
                {"query": f"a {colour} {shape}", "document": {"image": draw(c, s, rng)}, "label": label, "group": group}
            )
    return rows


def write(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    text = text_rows(random.Random(SEED))
    for row in text:
        for key in ("query", "document"):
            if len(row[key]) > MAX_TEXT:
                raise SystemExit(f"over {MAX_TEXT} characters: {row[key]!r}")
    images = image_rows(random.Random(SEED + 1))
    write(HERE / "text.jsonl", text)
    write(HERE / "image_text.jsonl", images)
    for name, rows in (("text.jsonl", text), ("image_text.jsonl", images)):
        positives = sum(r["label"] for r in rows)
        groups = len({r["group"] for r in rows})
        size = (HERE / name).stat().st_size
        share = positives / len(rows)
        print(f"{name}: {len(rows)} rows, {positives} positive ({share:.0%}), {groups} groups, {size:,} B")


if __name__ == "__main__":
    main()
