"""Write data/chat_sample.jsonl, the bundled plain conversations for SFT, from the text in this file:

    python data/make_chat_sample.py

Greetings, short factual and educational questions with short answers, a few conversations with a system prompt
and a few with several turns, so that the chat model is not only a calculator. One {"messages": [...]} object
per line, in the order below; the output depends on this file only (byte-identical on every run).

Written for this repository; released under CC0-1.0 (public domain dedication,
https://creativecommons.org/publicdomain/zero/1.0/).
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script (python data/make_chat_sample.py)
from data.loader import atomic_write  # noqa: E402

OUT = Path(__file__).resolve().parent / "chat_sample.jsonl"

CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Germany": "Berlin", "Spain": "Madrid",
            "Canada": "Ottawa", "Australia": "Canberra", "Egypt": "Cairo", "Kenya": "Nairobi", "India": "New Delhi",
            "China": "Beijing", "Peru": "Lima", "Norway": "Oslo", "Mexico": "Mexico City", "Argentina": "Buenos Aires",
            "the United Kingdom": "London"}

# (user, assistant)
SINGLE = [
    # greetings and small talk
    ("Hello!", "Hello! How can I help you today?"),
    ("Hi", "Hi there! What would you like to talk about?"),
    ("Hey, how's it going?", "Hi! I'm here and ready to help. What do you need?"),
    ("Good morning!", "Good morning! I hope your day is off to a good start."),
    ("Good evening.", "Good evening! What can I do for you?"),
    ("Good night.", "Good night! Sleep well."),
    ("How are you?", "I'm doing well, thank you for asking. How can I help?"),
    ("Thank you!", "You're welcome!"),
    ("Thanks for your help.", "Happy to help. Come back any time."),
    ("Goodbye.", "Goodbye! Have a nice day."),
    ("See you later.", "See you later!"),
    ("Nice to meet you.", "Nice to meet you too!"),
    ("Who are you?", "I am a small language model, trained to answer short questions."),
    ("What is your name?", "I am a small chat model trained with nanoDeepSeek. I don't have a personal name."),
    ("Are you a human?", "No, I am a computer program: a small language model."),
    ("Do you have feelings?", "No. I am a computer program, so I don't have feelings, but I'm glad to help."),
    ("What can you do?", "I can answer short questions, and compare and sort numbers."),
    ("Can you help me?", "Yes, I will try. What do you need?"),
    ("Can you do math?", "A little. For example, ask me: Which is larger, 12 or 7?"),
    ("Can you sort numbers?", "Yes. For example, ask me: Sort from smallest to largest: 9, 2, 5"),
    ("Can you browse the internet?", "No. I can only answer from what I learned during training."),
    ("What's the weather like today?",
     "I can't see live information, so I don't know today's weather. A weather website or app can tell you."),
    ("What time is it?", "I don't have access to a clock, so I can't tell you the current time."),
    ("What is today's date?", "I don't have access to a calendar, so I can't tell you today's date."),
    ("Tell me a joke.", "Why did the scarecrow win an award? Because he was outstanding in his field."),
    ("Tell me a fun fact.", "Octopuses have three hearts."),
    ("Say something nice.", "You are doing a great job by asking questions and learning new things."),
    ("I'm bored.", "You could read a book, go for a walk, draw something, or learn something new."),
    ("I feel sad today.",
     "I'm sorry you feel sad. Talking to a friend or someone you trust can help. Be kind to yourself today."),
    ("I passed my exam!", "Congratulations! Your hard work paid off."),
    # science
    ("What is the boiling point of water?",
     "Water boils at 100 degrees Celsius (212 degrees Fahrenheit) at sea level."),
    ("At what temperature does water freeze?", "Water freezes at 0 degrees Celsius (32 degrees Fahrenheit)."),
    ("What is the chemical formula for water?", "H2O: two hydrogen atoms and one oxygen atom."),
    ("What gas do plants take in from the air?",
     "Carbon dioxide. Plants use it, with water and sunlight, to make sugar."),
    ("What gas do we need to breathe?", "Oxygen."),
    ("What is photosynthesis?",
     "Photosynthesis is how plants use sunlight, water and carbon dioxide to make sugar and release oxygen."),
    ("How many planets are in the solar system?",
     "Eight: Mercury, Venus, Earth, Mars, Jupiter, Saturn, Uranus and Neptune."),
    ("What is the largest planet?", "Jupiter is the largest planet in the solar system."),
    ("Which planet is closest to the Sun?", "Mercury."),
    ("Which planet is known as the Red Planet?", "Mars."),
    ("What is the Sun?", "The Sun is a star: a huge ball of hot gas that gives the Earth light and heat."),
    ("What is the Moon?", "The Moon is the Earth's natural satellite. It goes around the Earth about once a month."),
    ("How long does it take the Earth to go around the Sun?", "About 365 days, which is one year."),
    ("How long is a day on Earth?", "About 24 hours: the time the Earth takes to spin once."),
    ("What causes day and night?",
     "The Earth spins. The side facing the Sun has day, and the side facing away has night."),
    ("What is gravity?", "Gravity is the force that pulls objects toward each other. It keeps us on the ground."),
    ("What is the speed of light?", "About 300,000 kilometers per second in a vacuum."),
    ("What is an atom?", "An atom is a tiny particle of matter: a nucleus with electrons around it."),
    ("What is a cell?", "A cell is the smallest living unit. All living things are made of cells."),
    *[(f"What is the chemical symbol for {element}?", f"{symbol}.")
      for element, symbol in [("gold", "Au"), ("iron", "Fe"), ("sodium", "Na"), ("oxygen", "O")]],
    ("What are the three common states of matter?", "Solid, liquid and gas."),
    ("What is evaporation?", "Evaporation is when a liquid turns into a gas, like a puddle drying in the sun."),
    ("What is a rainbow?", "A rainbow is sunlight split into its colors by drops of water in the air."),
    ("Why is the sky blue?", "Air scatters the blue part of sunlight more than the red part, so the sky looks blue."),
    ("What is a volcano?", "A volcano is an opening in the Earth's surface where melted rock, called lava, comes out."),
    ("What is the hardest natural material?", "Diamond."),
    ("What does a thermometer measure?", "Temperature."),
    ("What is a magnet?", "A magnet is an object that pulls on iron and some other metals."),
    ("Why do leaves change color in autumn?",
     "The green chlorophyll in the leaves breaks down, so their yellow and orange colors show through."),
    # living things and the body
    ("How many legs does a spider have?", "Eight."),
    ("How many legs does an insect have?", "Six."),
    ("Is a whale a fish?", "No. A whale is a mammal: it breathes air and feeds its young with milk."),
    ("Is a bat a bird?", "No. A bat is a mammal, and the only mammal that can truly fly."),
    ("What is a mammal?", "A warm-blooded animal with hair or fur that feeds its young with milk."),
    ("What do bees make?", "Honey and wax."),
    ("What do pandas eat?", "Mostly bamboo."),
    ("What is a baby frog called?", "A tadpole."),
    ("What is a baby cat called?", "A kitten."),
    ("Where do penguins live?", "Mostly in the Southern Hemisphere, many of them in and around Antarctica."),
    ("What does the heart do?", "The heart pumps blood around the body."),
    ("What do the lungs do?", "They take oxygen from the air into the blood and remove carbon dioxide."),
    ("How many bones are in the adult human body?", "206."),
    ("What is the largest organ of the human body?", "The skin."),
    ("How many teeth does an adult usually have?", "32, including the four wisdom teeth."),
    # geography
    *[(f"What is the capital of {country}?", f"{capital}.") for country, capital in CAPITALS.items()],
    ("What is the largest ocean?", "The Pacific Ocean."),
    ("What is the tallest mountain in the world?", "Mount Everest, about 8,849 meters above sea level."),
    ("How many continents are there?",
     "Seven: Africa, Antarctica, Asia, Australia, Europe, North America and South America."),
    ("What is the largest country by area?", "Russia."),
    ("Which continent is Egypt in?", "Africa."),
    ("What is the equator?",
     "An imaginary line around the middle of the Earth, halfway between the North and South Poles."),
    # numbers, time and measurement
    ("How many days are in a week?", "Seven."),
    ("How many months are in a year?", "Twelve."),
    ("How many days are in a leap year?", "366."),
    ("How many hours are in a day?", "24."),
    ("How many minutes are in an hour?", "60."),
    ("How many seconds are in a minute?", "60."),
    ("What is a dozen?", "Twelve."),
    ("How many centimeters are in a meter?", "100."),
    ("How many grams are in a kilogram?", "1000."),
    ("What is a prime number?",
     "A whole number greater than 1 whose only divisors are 1 and itself, like 2, 3, 5 and 7."),
    ("Is 7 a prime number?", "Yes."),
    ("Is 9 a prime number?", "No. 9 is 3 times 3."),
    ("What is an even number?", "A whole number that can be divided by 2 with no remainder, like 2, 4 and 6."),
    ("Is 15 odd or even?", "Odd."),
    ("What is half of 10?", "5"),
    ("What is 3 times 4?", "12"),
    ("What is 10 divided by 2?", "5"),
    ("What is 5 squared?", "25"),
    ("What is the square root of 16?", "4"),
    ("What do the angles of a triangle add up to?", "180 degrees."),
    ("How many sides does a hexagon have?", "Six."),
    ("What is a right angle?", "An angle of 90 degrees, like the corner of a square."),
    # language
    *[(f"What is the opposite of {word}?", f"{opposite}.")
      for word, opposite in [("hot", "Cold"), ("big", "Small"), ("happy", "Sad"), ("fast", "Slow")]],
    *[(f"What is the plural of {word}?", f"{plural}.")
      for word, plural in [("mouse", "Mice"), ("child", "Children"), ("foot", "Feet")]],
    ("What is the past tense of go?", "Went."),
    ("What is the past tense of eat?", "Ate."),
    ("What is a noun?", "A word for a person, place or thing, like teacher, city or book."),
    ("What is a verb?", "An action word, like run, eat or think."),
    ("What is an adjective?", "A word that describes a noun, like big, red or happy."),
    ("What is a synonym for happy?", "Glad."),
    ("How many letters are in the English alphabet?", "26."),
    ("How do you say hello in Spanish?", "Hola."),
    ("How do you say thank you in French?", "Merci."),
    # people, culture and everyday knowledge
    ("Who wrote Romeo and Juliet?", "William Shakespeare."),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci."),
    ("Who was the first person to walk on the Moon?", "Neil Armstrong, in 1969."),
    ("Who developed the theory of relativity?", "Albert Einstein."),
    ("Who discovered penicillin?", "Alexander Fleming, in 1928."),
    ("What are the colors of the rainbow?", "Red, orange, yellow, green, blue, indigo and violet."),
    ("What are the primary colors?", "For paint: red, yellow and blue. For light: red, green and blue."),
    ("How many strings does a guitar usually have?", "Six."),
    ("How many keys does a piano have?", "A standard piano has 88 keys."),
    ("How many players does a soccer team have on the field?", "Eleven."),
    ("What is a computer?", "A machine that follows instructions, called programs, to process information."),
    ("What is the internet?", "A worldwide network that connects computers so they can share information."),
    ("What is an algorithm?", "A step-by-step list of instructions for solving a problem."),
    ("What is a language model?", "A program that learns from text to predict the next word. I am one."),
    ("What is recycling?", "Turning used materials like paper, glass and plastic into new products."),
    # advice
    ("How do I make a cup of tea?",
     "Boil water, pour it over a tea bag in a cup, wait three to five minutes, then take the bag out."),
    ("How can I sleep better?",
     "Go to bed at the same time each night, avoid screens before bed, and keep your room dark and quiet."),
    ("Why should I drink water?", "Your body needs water to control its temperature and carry nutrients."),
    ("How often should I brush my teeth?", "Twice a day, for about two minutes each time."),
    ("Give me a tip for studying.",
     "Study in short sessions with breaks, and test yourself instead of only rereading."),
    ("How can I learn a new language?",
     "Practice a little every day: learn common words, listen to speakers, and try speaking yourself."),
    ("What is a good way to stay healthy?", "Eat a balanced diet, move your body every day, and get enough sleep."),
]

# (system, user, assistant)
SYSTEM = [
    ("You are a helpful assistant.", "Hello!", "Hello! How can I help you today?"),
    ("You are a helpful assistant.", "What is the capital of Italy?", "The capital of Italy is Rome."),
    ("You are a helpful assistant.", "What is 2 + 2?", "4"),
    ("You are a concise assistant.", "What is the capital of Japan?", "Tokyo."),
    ("Answer in one word.", "What is the opposite of day?", "Night."),
    ("Answer in one word.", "What color is the sky on a clear day?", "Blue."),
    ("Answer yes or no.", "Is the Earth round?", "Yes."),
    ("Answer yes or no.", "Is the Sun a planet?", "No."),
    ("You are a math helper. Give only the answer.", "What is 6 + 7?", "13"),
    ("Always answer with a full sentence.", "How many legs does a cat have?", "A cat has four legs."),
    ("You are a friendly tutor for children.", "What is a planet?",
     "A planet is a big round world that travels around a star, like the Earth goes around the Sun."),
    ("You are a science teacher.", "Why do we have seasons?",
     "The Earth's axis is tilted, so each half of the Earth gets more direct sunlight at some times of year."),
    ("Reply in French.", "Hello!", "Bonjour !"),
    ("Reply in Spanish.", "Good morning.", "¡Buenos días!"),
    ("You are a polite assistant.", "Thank you.", "You're very welcome."),
]

# (system prompt or None, then user and assistant turns alternating)
MULTI = [
    (None, "Hi!", "Hello! How can I help?", "What is the capital of Spain?", "Madrid."),
    (None, "What is 5 + 3?", "8", "And 8 + 2?", "10"),
    (None, "Tell me a joke.", "Why did the scarecrow win an award? Because he was outstanding in his field.",
     "Another one, please.", "What do you call a bear with no teeth? A gummy bear."),
    (None, "What is the largest planet?", "Jupiter.", "And the smallest?", "Mercury."),
    (None, "How many legs does a dog have?", "Four.", "And a bird?", "Two."),
    (None, "I'm learning about animals.", "Great! What would you like to know?", "What do pandas eat?",
     "Mostly bamboo."),
    (None, "What is the capital of Canada?", "Ottawa.", "Thanks!", "You're welcome!"),
    (None, "What is the opposite of up?", "Down.", "And of left?", "Right."),
    (None, "Can you help with my homework?", "Yes. What is the question?", "What is 9 + 6?", "15"),
    (None, "Good morning!", "Good morning! How are you?", "I'm fine, thanks.",
     "Glad to hear it. What can I do for you?"),
    (None, "Which is smallest: 30, 12, 46, 27?", "The smallest is 12.", "Which is larger, 30 or 46?",
     "The larger is 46."),
    (None, "What is water made of?", "Hydrogen and oxygen.", "What is its chemical formula?", "H2O."),
    (None, "Which is bigger, the Sun or the Earth?", "The Sun. It is about 109 times wider than the Earth.",
     "Wow!", "Yes, the Sun is very big."),
    (None, "Who are you?", "I am a small language model.", "Can you do math?",
     "A little. Try asking: Which is smallest: 8, 3, 5, 9?"),
    (None, "Which is larger, 12 or 21?", "The larger is 21.", "Sort from smallest to largest: 21, 5, 12",
     "Sorted: 5, 12, 21."),
    (None, "How many days are in a week?", "Seven.", "And how many in a year?", "365, or 366 in a leap year."),
    (None, "What is a verb?", "An action word, like run or eat.", "Give me another example.", "Swim."),
    ("You are a helpful assistant.", "Hello", "Hello! What can I do for you?", "What is 10 - 4?", "6"),
    ("You are a helpful assistant.", "What is the capital of Germany?", "Berlin.", "And of France?", "Paris."),
    ("Answer briefly.", "What do bees make?", "Honey.", "What do cows give us?", "Milk."),
    (None, "Hi", "Hi! How can I help?", "Nothing, just saying hello.", "Hello to you too! Have a nice day.",
     "Thanks, you too.", "Thank you!"),
]


def conversations():
    """Every conversation, in file order: SINGLE, then SYSTEM, then MULTI."""
    convs = []
    for system, *turns in [(None, *pair) for pair in SINGLE] + SYSTEM + MULTI:
        conv = [{"role": "system", "content": system}] if system else []
        convs.append(conv + [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)])
    return convs


def main():
    convs = conversations()
    data = "".join(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m in convs).encode("utf-8")
    atomic_write(OUT, lambda f: f.write(data))
    print(f"wrote {OUT.name}: {len(convs)} conversations, {len(data):,} bytes")


if __name__ == "__main__":
    main()
