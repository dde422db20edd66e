/**
 * Live refinement with `wsiseg serve` (QuPath 0.5 – 0.7; Java's own HttpClient, nothing to
 * install).
 *
 * Run from the script editor on an open image whose name matches a slide the server serves
 * (`wsiseg serve OUT --refiner randomwalk` or `--refinenet W`; the image name without its
 * extension is the slide id, as for import_wsiseg.groovy).
 *
 * LIVE = false: sends the scribbles the server has not seen (new or changed Tumor / Stroma /
 *   other annotations), and the AI contours when one of them was edited or deleted; then
 *   updates the "Tumor (AI)" annotations to the round's contours (ids kept, locked) and
 *   prints the round. The server answers only the round's change (?contours=changed): the
 *   contours it removed go, the ones it added come, the others stay as they are. The whole
 *   round is imported instead (GET contours) on the first round, after an edited or deleted
 *   AI contour, and when the slide moved on since the script last saw it (another client's
 *   round or an undo).
 * LIVE = true: does the same once, then installs a hierarchy listener, so every annotation
 *   drawn afterwards is sent as soon as the brush is released (debounced by DEBOUNCE_MS).
 *   Running the script again (either setting) removes the listener first; with LIVE = true
 *   it installs a new one, so run it with LIVE = false to stop live mode.
 *
 * See scripts/qupath/README.md for binding it to a keyboard shortcut.
 */

import java.net.URI
import java.net.http.HttpClient
import java.net.http.HttpRequest
import java.net.http.HttpResponse
import java.nio.file.Files
import java.time.Duration

import qupath.lib.common.GeneralTools
import qupath.lib.io.PathIO
import qupath.lib.objects.hierarchy.events.PathObjectHierarchyListener

// ---- settings --------------------------------------------------------------------------
def SERVER = 'http://127.0.0.1:8765'   // what `wsiseg serve` printed
def TOKEN = ''                          // the printed token, when the server needs one
def LIVE = false                        // true: send every new annotation on release
def DEBOUNCE_MS = 400                   // live mode: wait this long after the last change
def AI_CLASS = 'Tumor (AI)'             // the workflow's contours.class_name
// ----------------------------------------------------------------------------------------

def KEY = 'wsiseg.live'   // where the live listener is kept between runs of the script
def SENT = 'wsiseg_sent'  // metadata on a scribble: the hash of the geometry last sent
def SEEN = 'wsiseg_roi'   // metadata on an AI contour: the hash of the geometry imported
def ROUNDS = 'wsiseg.rounds'  // per server and slide: the round last imported, and its ids

// Running the script again removes the listener it installed before.
def previous = System.getProperties().remove(KEY)
if (previous != null) {
    previous[0].removeListener(previous[1])
    previous[2].cancel()
    println 'wsiseg: live mode off'
}

def imageData = getCurrentImageData()
if (imageData == null) {
    println 'wsiseg: open an image first'
    return
}
def hierarchy = imageData.getHierarchy()
def client = HttpClient.newBuilder().connectTimeout(Duration.ofSeconds(5)).build()

def request = { String path ->
    def b = HttpRequest.newBuilder(URI.create(SERVER + path)).timeout(Duration.ofMinutes(5))
    if (TOKEN)
        b.header('X-Wsiseg-Token', TOKEN)
    return b
}
def send = { HttpRequest req ->
    def response = client.send(req, HttpResponse.BodyHandlers.ofString())
    if (response.statusCode() >= 400) {
        def detail = response.body()
        try { detail = new groovy.json.JsonSlurper().parseText(detail).detail } catch (ignored) {}
        throw new IOException("server answered ${response.statusCode()}: ${detail}")
    }
    return response.body()
}

// ---- which served slide is this image? -------------------------------------------------
def imageName = getProjectEntry() != null ? getProjectEntry().getImageName() :
        imageData.getServer().getMetadata().getName()
def candidates = [
    GeneralTools.stripExtension(imageName),
    imageName.contains('.') ? imageName.substring(0, imageName.indexOf('.')) : imageName,
    imageName,
].unique()
def slides
try {
    slides = new groovy.json.JsonSlurper().parseText(send(request('/slides').GET().build()))
} catch (Exception e) {
    println "wsiseg: cannot reach ${SERVER} (${e.getMessage()}); is `wsiseg serve` running?"
    return
}
def slide = candidates.findResult { c -> slides.find { it.id == c } }
if (slide == null) {
    println "wsiseg: ${imageName}: the server serves no slide of that name " +
            "(it serves ${slides.collect { it.id }.join(', ')})"
    return
}
def slideId = slide.id
// What the script last imported for this slide (kept between runs, like the listener):
// [round: k, ids: the AI contour ids of round k], or null.
def seenRounds = System.getProperties().computeIfAbsent(ROUNDS,
        { new java.util.concurrent.ConcurrentHashMap() } as java.util.function.Function)
def seenKey = SERVER + ' ' + slideId

// ---- helpers ---------------------------------------------------------------------------
def isAi = { p ->
    def c = p.getPathClass()
    if (c != null && c.toString() == AI_CLASS)
        return true
    def m = p.getMetadata()
    return m != null && m.get('source') == 'wsiseg'
}
def hashOf = { p -> Integer.toHexString(p.getROI().getGeometry().norm().toText().hashCode()) }
def busy = new java.util.concurrent.atomic.AtomicBoolean(false)

/** GeoJSON text → AI contours as the server wrote them (ids kept), locked. */
def readContours = { String geojson ->
    def tmp = Files.createTempFile('wsiseg-' + slideId + '-', '.geojson')
    try {
        Files.writeString(tmp, geojson)
        def objects = PathIO.readObjects(tmp.toFile()).findAll { it.isAnnotation() }
        objects.each {
            it.setLocked(true)
            it.getMetadata().put(SEEN, hashOf(it))
        }
        return objects
    } finally {
        Files.deleteIfExists(tmp)
    }
}
def aiIds = {
    hierarchy.getAnnotationObjects().findAll { isAi(it) }.collect { it.getID().toString() } as Set
}

/** The AI contours whose id is in `removed` (null: all) go, `added` come in; remember it. */
def replaceContours = { Set removed, List added, int round ->
    def old = hierarchy.getAnnotationObjects().findAll {
        isAi(it) && (removed == null || removed.contains(it.getID().toString()))
    }
    hierarchy.removeObjects(old, true)   // true: keep scribbles nested inside a contour
    hierarchy.addObjects(added)
    seenRounds.put(seenKey, [round: round, ids: aiIds()])
}

/** Import the latest contours whole: replace every AI contour. */
def importLatest = { int round ->
    replaceContours(null, readContours(send(request("/slides/${slideId}/contours").GET().build())),
            round)
    return 'whole round imported'
}

/** Follow a ?contours=changed answer, when it starts from the round imported here. */
def followChange = { answer, boolean sentAi, Set localIds ->
    def seen = seenRounds.get(seenKey)
    def removed = answer.changed.removed as Set
    if (sentAi || seen == null || seen.round != answer.previous_round ||
            !localIds.containsAll(removed))
        return importLatest(answer.round)
    replaceContours(removed, readContours(groovy.json.JsonOutput.toJson(answer.contours)),
            answer.round)
    return 'change followed'
}

/** One round: unseen scribbles (+ all AI contours when one was edited or deleted). */
def sendRound = {
    def annotations = hierarchy.getAnnotationObjects()
    def ai = annotations.findAll { isAi(it) }
    def scribbles = annotations.findAll {
        !isAi(it) && it.getPathClass() != null && it.getROI() != null &&
                it.getMetadata().get(SENT) != hashOf(it)
    }
    def localIds = ai.collect { it.getID().toString() } as Set
    // The server's contours: those imported here last, when every AI contour here is one of
    // them; else (first run, another import) the whole round's ids.
    def seen = seenRounds.get(seenKey)
    def servedIds = seen != null && seen.ids.containsAll(localIds) ? seen.ids :
            new groovy.json.JsonSlurper().parseText(send(request("/slides/${slideId}/contours")
                    .GET().build())).features.collect { it.id } as Set
    boolean edited = ai.any { it.getMetadata().get(SEEN) != hashOf(it) }
    boolean deleted = !localIds.isEmpty() && !servedIds.every { localIds.contains(it) }
    // An export holding some AI contours but not others says the others were deleted: send
    // all of them, or none when none changed.
    boolean sentAi = edited || deleted
    def toSend = scribbles + (sentAi ? ai : [])
    if (toSend.isEmpty()) {
        println "wsiseg: ${slideId}: nothing new to send"
        return
    }
    def tmp = Files.createTempFile('wsiseg-' + slideId + '-', '.geojson')
    try {
        exportObjectsToGeoJson(toSend, tmp.toString(), 'FEATURE_COLLECTION')
        def body = send(request("/slides/${slideId}/scribbles?contours=changed")
                .header('Content-Type', 'application/geo+json')
                .POST(HttpRequest.BodyPublishers.ofFile(tmp)).build())
        def answer = new groovy.json.JsonSlurper().parseText(body)
        scribbles.each { it.getMetadata().put(SENT, hashOf(it)) }
        if (answer.refined) {
            def how = followChange(answer, sentAi, localIds)
            println "wsiseg: ${slideId}: round ${answer.round}: ${answer.new_pixels} new px, " +
                    "${answer.windows} window(s), tumor ${answer.tumor_mm2_before} → " +
                    "${answer.tumor_mm2} mm², ${aiIds().size()} contour(s) " +
                    "(+${answer.changed.added.size()} −${answer.changed.removed.size()}, " +
                    "${how}), ${answer.timings.served_s} s"
        } else {
            println "wsiseg: ${slideId}: ${answer.message}"
        }
    } finally {
        Files.deleteIfExists(tmp)
    }
}

def runGuarded = {
    if (!busy.compareAndSet(false, true))
        return
    try {
        sendRound()
    } catch (Exception e) {
        println "wsiseg: ${slideId}: ${e.getMessage()}"
    } finally {
        busy.set(false)
    }
}

// ---- once, then live -------------------------------------------------------------------
// Contours imported by import_wsiseg.groovy carry no hash yet: the first run takes them as
// they are now, so edits made before it are not seen as edits (scribbles are).
hierarchy.getAnnotationObjects().findAll { isAi(it) && it.getMetadata().get(SEEN) == null }
        .each { it.getMetadata().put(SEEN, hashOf(it)) }
runGuarded()

if (LIVE) {
    def timer = new java.util.Timer('wsiseg-live', true)
    def pending = [null]
    def listener = { event ->
        if (event.isChanging() || busy.get())
            return   // the brush is still down, or our own import
        def touched = event.getChangedObjects().any { it.isAnnotation() && !isAi(it) }
        if (!touched && !event.isStructureChangeEvent())
            return
        if (pending[0] != null)
            pending[0].cancel()
        // on the timer's thread, not the UI's
        pending[0] = timer.runAfter(DEBOUNCE_MS) { runGuarded() }
    } as PathObjectHierarchyListener
    hierarchy.addListener(listener)
    System.getProperties().put(KEY, [hierarchy, listener, timer])
    println "wsiseg: live mode on for ${slideId} (run the script with LIVE = false to stop)"
}
